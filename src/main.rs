use clap::Parser;

// malloc and free were about a quarter of `nura serve`'s CPU under load with glibc's allocator;
// mimalloc measured 10 % more HTTP commands/s (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = nura::config::Cli::parse();
    nura::telemetry::init(&cli.log);
    if let Err(e) = nura::run(cli).await {
        tracing::error!(error = format!("{e:#}"), "nura exited with an error");
        return Err(e);
    }
    Ok(())
}
