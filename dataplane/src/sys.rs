//! The one place the data plane calls the C library directly, for what neither std nor the safe wrappers
//! offer. Each call says why it is sound.

#![allow(unsafe_code)]

/// Gives the allocator's free pages back to the system. glibc keeps memory freed by worker threads in
/// their arenas, so after a burst of UDP sessions the process would stay at its peak for good; this asks
/// it to return what is free. Cheap enough after a table shrinks, far too costly per packet.
pub(crate) fn release_free_memory() {
    // SAFETY: malloc_trim takes no pointer of ours; it only walks the allocator's own free lists under the
    // allocator's locks, and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One message taken by [`recv_with_descriptors`].
#[derive(Debug)]
pub(crate) struct ReceivedMessage {
    /// Bytes written into the body buffer.
    pub(crate) len: usize,
    /// The message was longer than the buffer (`MSG_TRUNC`).
    pub(crate) truncated: bool,
    /// The descriptors the message carried, this process's from here on (close-on-exec).
    pub(crate) fds: Vec<std::os::fd::OwnedFd>,
}

/// Receives one message on the socket `socket` into `body`, with room for the descriptors `space` holds
/// (a `nix::cmsg_space!` buffer). The descriptors of its `SCM_RIGHTS` are owned by the result: their
/// numbers never leave this function, so no caller can own one twice.
pub(crate) fn recv_with_descriptors(
    socket: std::os::fd::BorrowedFd<'_>,
    body: &mut [u8],
    space: &mut [u8],
) -> std::io::Result<ReceivedMessage> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut iov = [std::io::IoSliceMut::new(body)];
    let message = recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for cmsg in message.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel installed each of these descriptors in this process for the recvmsg call
            // just made, and nothing else in the process has seen their numbers: each is open and owned
            // here and only here.
            fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    Ok(ReceivedMessage { len: message.bytes, truncated: message.flags.contains(MsgFlags::MSG_TRUNC), fds })
}

/// Registers `fd` with the runtime, to wait for its readiness.
pub(crate) fn async_fd(fd: std::os::fd::OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: the `OwnedFd` is moved into the `AsyncFd`, which keeps it open for as long as it is registered
    // and deregisters it before closing it; nothing else can close or replace the descriptor meanwhile.
    unsafe { tokio::io::unix::AsyncFd::register(fd).map_err(std::io::Error::from) }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{IoSlice, Read, Write},
        os::fd::{AsFd, AsRawFd, OwnedFd},
    };

    use nix::sys::socket::{AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair};

    use super::recv_with_descriptors;

    #[test]
    fn descriptors_of_a_message_arrive_owned_and_work() {
        let (ours, theirs) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).expect("socketpair");
        let (mut reader, writer) = std::io::pipe().expect("pipe");
        let writer = OwnedFd::from(writer);
        let rights = [writer.as_raw_fd(), writer.as_raw_fd()];
        let sent = sendmsg::<()>(
            theirs.as_raw_fd(),
            &[IoSlice::new(b"Fhello")],
            &[ControlMessage::ScmRights(&rights)],
            MsgFlags::empty(),
            None,
        );
        assert_eq!(sent.expect("sendmsg"), 6);
        drop(writer);

        let (mut body, mut space) = (vec![0u8; 64], nix::cmsg_space!([std::os::fd::RawFd; 4]));
        let message = recv_with_descriptors(ours.as_fd(), &mut body, &mut space).expect("recvmsg");
        assert_eq!((message.len, message.truncated, message.fds.len()), (6, false, 2));
        assert_eq!(&body[..6], b"Fhello");
        // Two new numbers, both open on the pipe's write end.
        assert_ne!(message.fds[0].as_raw_fd(), message.fds[1].as_raw_fd());
        let mut fds = message.fds.into_iter();
        let mut first = std::fs::File::from(fds.next().expect("a descriptor"));
        first.write_all(b"x").expect("write through a received descriptor");
        drop((first, fds));
        // Every copy of the write end is closed once the message is dropped: the reader sees the end.
        let mut read = Vec::new();
        reader.read_to_end(&mut read).expect("read");
        assert_eq!(read, b"x");
    }

    #[test]
    fn a_message_longer_than_the_buffer_is_marked_truncated() {
        let (ours, theirs) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).expect("socketpair");
        let sent = sendmsg::<()>(theirs.as_raw_fd(), &[IoSlice::new(&[7u8; 32])], &[], MsgFlags::empty(), None);
        assert_eq!(sent.expect("sendmsg"), 32);
        let (mut body, mut space) = (vec![0u8; 8], nix::cmsg_space!([std::os::fd::RawFd; 1]));
        let message = recv_with_descriptors(ours.as_fd(), &mut body, &mut space).expect("recvmsg");
        assert!(message.truncated && message.fds.is_empty(), "{message:?}");
    }
}
