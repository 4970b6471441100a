// `sqlx::migrate!` embeds `../migrations`; a migration added there must rebuild this crate.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
