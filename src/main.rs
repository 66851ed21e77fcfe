fn main() -> std::process::ExitCode {
    avatar_warden::run_cli()
}
