//! The `oxbox` command: parses the command line, dispatches to `cli/`, and
//! turns errors into one `error:` line and a documented exit code.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    oxbox::guard::install_quiet_panic_hook();
    let args = cli::Cli::parse();
    cli::init_logging(args.verbose);
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the whole cause chain, outermost first.
            eprintln!("error: {}", format!("{err:#}").replace('\n', " "));
            ExitCode::from(cli::exit_code(&err))
        }
    }
}
