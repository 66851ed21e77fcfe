fn main() -> std::process::ExitCode {
    avatar_warden::cli::main()
}
