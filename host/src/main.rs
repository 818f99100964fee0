//! The `oxbox` command: parses the command line, dispatches to `cli/`, and
//! turns errors into one `error:` line and a documented exit code.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    oxbox::guard::install_quiet_panic_hook();
    let args = cli::Cli::parse();
    let server = matches!(
        args.command,
        cli::Command::Serve(_) | cli::Command::Aggregator(cli::AggregatorCommand::Serve(_))
    );
    if !server {
        restore_sigpipe();
    }
    cli::init_logging(args.verbose, server);
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the whole cause chain, outermost first.
            eprintln!("error: {}", format!("{err:#}").replace('\n', " "));
            ExitCode::from(cli::exit_code(&err))
        }
    }
}

/// Rust ignores SIGPIPE, so `oxbox dicom info F | head` would fail printing
/// and panic; a command-line tool should end quietly instead, as `cat` does.
/// (The server keeps SIGPIPE ignored: a client hanging up must not stop it.)
fn restore_sigpipe() {
    // SAFETY: setting a signal disposition to its default at start-up,
    // before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
