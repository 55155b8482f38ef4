//! `bkp-xtask gen DIR`: man pages (DIR/man/NAME/) and bash, zsh and fish
//! completions (DIR/completions/) for `bkp-server` and `bkp`, rendered
//! from the same clap definitions the binaries parse with, so they cannot
//! drift from the real flags. `make deb` runs it before `cargo deb`,
//! whose assets pick the files up from the target directory.
//!
//! A crate of its own so that neither shipped binary links the
//! generators.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap_complete::Shell;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd, dir] if cmd == "gen" => match generate(Path::new(dir)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bkp-xtask: {e}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("usage: bkp-xtask gen DIR");
            ExitCode::from(2)
        }
    }
}

fn generate(dir: &Path) -> std::io::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d)?;
    }
    for cmd in [bkp_server::cli::command(), bkp_client::cli::command()] {
        let name = cmd.get_name().to_string();
        // One page per subcommand too (bkp-server-token-create.1, ...),
        // which the top page's SUBCOMMANDS section refers to; a directory
        // per binary, since "bkp*" would also match bkp-server's pages.
        let pages = man.join(&name);
        std::fs::create_dir_all(&pages)?;
        clap_mangen::generate_to(cmd.clone(), &pages)?;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let written: PathBuf = clap_complete::generate_to(shell, &mut cmd.clone(), &name, &completions)?;
            eprintln!("wrote {}", written.display());
        }
    }
    eprintln!("wrote man pages to {}", man.display());
    Ok(())
}
