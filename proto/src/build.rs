//! What a binary was built from, for `--version` and `switchboard_build_info`: the package version, the
//! git commit and the build profile, recorded by the crate's build script.

/// The package version, e.g. `0.1.0`.
pub const PKG_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The commit's short hash, with `-dirty` when tracked files differed from it, or `unknown` when built
/// outside a git checkout (from a crate tarball, say).
pub const COMMIT: &str = env!("SWITCHBOARD_BUILD_COMMIT");

/// `debug` or `release`.
pub const PROFILE: &str = env!("SWITCHBOARD_BUILD_PROFILE");

/// What `--version` prints after the binary's name: `0.1.0 (commit 1a2b3c4, release)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SWITCHBOARD_BUILD_COMMIT"),
    ", ",
    env!("SWITCHBOARD_BUILD_PROFILE"),
    ")"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names_the_package_version_commit_and_profile() {
        assert_eq!(VERSION, format!("{PKG_VERSION} (commit {COMMIT}, {PROFILE})"));
        assert!(PROFILE == "debug" || PROFILE == "release", "{PROFILE}");
        let hash = COMMIT.strip_suffix("-dirty").unwrap_or(COMMIT);
        assert!(hash == "unknown" || hash.chars().all(|c| c.is_ascii_hexdigit()), "{COMMIT}");
    }
}
