//! Errors of the agent.

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
