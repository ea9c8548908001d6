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
