//! Errors of the agent.

/// A flag value that makes no sense. The agent prints it on one line and exits 64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {flag}: {why}")]
pub struct ConfigError {
    /// The flag, with its dashes.
    pub flag: &'static str,
    /// What is wrong with it.
    pub why: String,
}

/// Why the agent cannot go on. Printed on one line; the agent exits 1.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The controller was never reached within `--startup-timeout`.
    #[error("cannot reach the controller at {controller} (gave up after {waited:?}): {last}")]
    Unreachable {
        /// `--controller`.
        controller: String,
        /// How long the agent tried.
        waited: std::time::Duration,
        /// The last error.
        last: String,
    },
    /// The controller refused the registration at startup (a port it does not allow, no node could bind it).
    #[error("the controller refused {service}: {why}")]
    Refused {
        /// `tcp:80` and so on.
        service: String,
        /// The controller's reason.
        why: String,
    },
}
