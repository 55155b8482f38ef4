fn main() -> std::process::ExitCode {
    bkp_client::cli::main()
}
