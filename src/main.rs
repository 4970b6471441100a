use clap::Parser;

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
