use std::process::ExitCode;

fn main() -> ExitCode {
    fastcache::cli::main()
}
