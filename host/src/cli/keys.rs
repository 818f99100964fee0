//! `oxbox keys generate`: an Ed25519 signing key pair.

use std::path::PathBuf;

use oxbox::signing;

/// Arguments of `oxbox keys generate`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  oxbox keys generate --out /etc/oxbox/keys\n\n\
Writes signing-key.pk8 (Ed25519, PKCS#8, mode 0600) and signing-key.pub (hex), and \
prints the public key: put it in sandbox.trusted_plugin_keys of the boxes that should \
accept what this key signs. Never overwrites an existing key: if DIR already holds \
signing-key.pk8 it says so and exits 2."
)]
pub struct GenerateArgs {
    /// Directory for the key files (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Runs `oxbox keys generate`.
pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let (private, public) = signing::generate_keypair(&args.out)?;
    println!(
        "{}",
        serde_json::json!({ "private_key": private.display().to_string(), "public_key": public })
    );
    Ok(())
}
