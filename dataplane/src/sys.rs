//! The one place the data plane calls the C library directly, for what neither std nor the safe wrappers
//! offer. Each call says why it is sound.

#![allow(unsafe_code)]

/// Gives the allocator's free pages back to the system. glibc keeps memory freed by worker threads in
/// their arenas, so after a burst of UDP sessions the process would stay at its peak for good; this asks
/// it to return what is free. Cheap enough after a table shrinks, far too costly per packet.
pub fn release_free_memory() {
    // SAFETY: malloc_trim takes no pointer of ours; it only walks the allocator's own free lists under the
    // allocator's locks, and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Takes ownership of descriptors the kernel just installed in this process: those of an `SCM_RIGHTS`
/// message received by `recvmsg`, or a connection returned by `accept4`.
pub fn own_new_descriptors(fds: &[std::os::fd::RawFd]) -> Vec<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    fds.iter()
        // SAFETY: each descriptor was created for this process by the call that returned it, a moment ago,
        // and nothing else in the process knows its number: it is open, and owned here and only here.
        .map(|&fd| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
        .collect()
}

/// Registers `fd` with the runtime, to wait for its readiness.
pub fn async_fd(fd: std::os::fd::OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: the `OwnedFd` is moved into the `AsyncFd`, which keeps it open for as long as it is registered
    // and deregisters it before closing it; nothing else can close or replace the descriptor meanwhile.
    unsafe { tokio::io::unix::AsyncFd::register(fd).map_err(std::io::Error::from) }
}
