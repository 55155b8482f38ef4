fn main() -> std::process::ExitCode {
    bkp_server::cli::main()
}
