//! Compiles `switchboard/v1/*.proto` with protox (pure Rust, so no `protoc` is needed) and generates the
//! tonic clients and servers, plus the encoded descriptor set that server reflection serves. Also records
//! what the binaries are built from (`SWITCHBOARD_BUILD_COMMIT`, `SWITCHBOARD_BUILD_PROFILE`) for
//! `--version` and the metrics.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "switchboard/v1/types.proto",
        "switchboard/v1/registry.proto",
        "switchboard/v1/dataplane.proto",
        "switchboard/v1/admin.proto",
    ];
    println!("cargo:rerun-if-changed=switchboard");

    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("switchboard_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().compile_fds(fds)?;

    build_info()?;
    Ok(())
}

/// Sets the commit (short hash, `-dirty` when tracked files differ from it, `unknown` outside a git
/// checkout, e.g. built from a crate tarball) and the profile. `SWITCHBOARD_BUILD_COMMIT` in the
/// environment overrides the commit, for builds from an exported source tree. The script reruns when HEAD
/// or its branch moves, not on every edit, so `-dirty` is as of the last commit or checkout.
fn build_info() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=SWITCHBOARD_BUILD_COMMIT");
    let commit = match env::var("SWITCHBOARD_BUILD_COMMIT") {
        Ok(commit) if !commit.is_empty() => commit,
        _ => git_commit(Path::new(&env::var("CARGO_MANIFEST_DIR")?)).unwrap_or_else(|| "unknown".to_owned()),
    };
    println!("cargo:rustc-env=SWITCHBOARD_BUILD_COMMIT={commit}");
    // "debug" or "release": the profile the built profile inherits from.
    println!("cargo:rustc-env=SWITCHBOARD_BUILD_PROFILE={}", env::var("PROFILE")?);
    Ok(())
}

/// The short hash of HEAD, with `-dirty`, when `dir` is in a git checkout that tracks this crate; `None`
/// when git or the checkout is missing. Never takes git's index lock, so it cannot disturb a concurrent
/// `git add` in the same tree.
fn git_commit(dir: &Path) -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").arg("--no-optional-locks").args(args).current_dir(dir).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    // A crate unpacked inside some other repository is not built from that repository's commits.
    git(&["ls-files", "--error-unmatch", "build.rs"])?;
    let hash = git(&["rev-parse", "--short=7", "HEAD"])?;
    // What moves with a commit or checkout: HEAD, and the branch's ref, loose or packed. A path that does
    // not exist would rerun the script on every build, so only existing ones are watched; while the branch
    // is packed, its folder is watched for the loose ref the next commit writes.
    let path = |name: &str| git(&["rev-parse", "--git-path", name]).map(|p| dir.join(p));
    let mut watched = vec![path("HEAD")?];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        let loose = path(&branch)?;
        if loose.exists() {
            watched.push(loose);
        } else {
            watched.extend(loose.parent().map(Path::to_path_buf));
            watched.push(path("packed-refs")?);
        }
    }
    for file in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty();
    Some(if dirty { format!("{hash}-dirty") } else { hash })
}
