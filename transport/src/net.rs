//! TCP sockets set up with socket2: listeners and connections for the control and channel
//! connections, with the options a migration link wants (TCP_NODELAY, large buffers) and
//! errors that name the address.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use thiserror::Error;

/// Errors of the socket layer; every one names the address it is about.
#[derive(Debug, Error)]
pub enum NetError {
    #[error("cannot resolve '{addr}': {source}")]
    Resolve { addr: String, source: io::Error },
    #[error("'{addr}' resolves to no address")]
    NoAddress { addr: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("accepting on {addr}: {source}")]
    Accept { addr: SocketAddr, source: io::Error },
    #[error("timed out after {secs:.1} s waiting for a connection on {addr}")]
    AcceptTimeout { addr: SocketAddr, secs: f64 },
    #[error("setting {option} on the connection with {addr}: {source}")]
    SetOption {
        addr: SocketAddr,
        option: &'static str,
        source: io::Error,
    },
}

/// Socket options applied to every control and channel connection.
#[derive(Clone, Copy, Debug)]
pub struct SocketOptions {
    /// SO_SNDBUF / SO_RCVBUF in bytes; `None` keeps the kernel's autotuning.
    pub buffer_size: Option<usize>,
    /// Timeout of a connect attempt.
    pub connect_timeout: Duration,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            buffer_size: None,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Resolve `addr` ("host:port") to its first socket address.
pub fn resolve(addr: &str) -> Result<SocketAddr, NetError> {
    addr.to_socket_addrs()
        .map_err(|source| NetError::Resolve {
            addr: addr.to_string(),
            source,
        })?
        .next()
        .ok_or_else(|| NetError::NoAddress {
            addr: addr.to_string(),
        })
}

/// Listen on `addr` with SO_REUSEADDR (a restarted receiver can bind at once).
pub fn listen(addr: SocketAddr) -> Result<TcpListener, NetError> {
    let err = |source| NetError::Listen { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(256).map_err(err)?;
    Ok(socket.into())
}

/// Connect to `addr` within `opts.connect_timeout` and apply [`configure`].
pub fn connect(addr: SocketAddr, opts: &SocketOptions) -> Result<TcpStream, NetError> {
    let err = |source| NetError::Connect { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    if let Some(size) = opts.buffer_size {
        // Buffer sizes must be set before connect to affect the window scale.
        set_buffers(&socket, addr, size)?;
    }
    socket
        .connect_timeout(&addr.into(), opts.connect_timeout)
        .map_err(err)?;
    let stream: TcpStream = socket.into();
    configure(&stream, opts)?;
    Ok(stream)
}

/// Accept one connection, waiting at most `timeout`, and apply [`configure`].
/// Wait until `fd` is readable (data, EOF or error pending) or `timeout` passes; `Ok(false)`
/// on timeout. Signals restart the wait.
pub fn wait_readable(fd: std::os::fd::RawFd, timeout: Duration) -> io::Result<bool> {
    Ok(wait_readable_any(&[fd], timeout)?.is_some())
}

/// Wait until one of `fds` is readable or `timeout` passes; returns the index of a readable
/// one, `None` on timeout. Signals restart the wait.
pub fn wait_readable_any(
    fds: &[std::os::fd::RawFd],
    timeout: Duration,
) -> io::Result<Option<usize>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds for the duration of the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(pfds.iter().position(|p| p.revents != 0));
    }
}

pub fn accept(
    listener: &TcpListener,
    timeout: Duration,
    opts: &SocketOptions,
) -> Result<(TcpStream, SocketAddr), NetError> {
    let local = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let fd = {
        use std::os::fd::AsRawFd;
        listener.as_raw_fd()
    };
    if !wait_readable(fd, timeout).map_err(|e| NetError::Accept {
        addr: local,
        source: e,
    })? {
        return Err(NetError::AcceptTimeout {
            addr: local,
            secs: timeout.as_secs_f64(),
        });
    }
    let (stream, peer) = listener.accept().map_err(|source| NetError::Accept {
        addr: local,
        source,
    })?;
    configure(&stream, opts)?;
    Ok((stream, peer))
}

/// TCP_NODELAY (a packet is one sendmsg; never wait for more), optional buffer sizes.
pub fn configure(stream: &TcpStream, opts: &SocketOptions) -> Result<(), NetError> {
    let addr = stream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    stream
        .set_nodelay(true)
        .map_err(|source| NetError::SetOption {
            addr,
            option: "TCP_NODELAY",
            source,
        })?;
    if let Some(size) = opts.buffer_size {
        set_buffers(&SockRef::from(stream), addr, size)?;
    }
    Ok(())
}

fn set_buffers(socket: &Socket, addr: SocketAddr, size: usize) -> Result<(), NetError> {
    socket
        .set_send_buffer_size(size)
        .map_err(|source| NetError::SetOption {
            addr,
            option: "SO_SNDBUF",
            source,
        })?;
    socket
        .set_recv_buffer_size(size)
        .map_err(|source| NetError::SetOption {
            addr,
            option: "SO_RCVBUF",
            source,
        })?;
    Ok(())
}

/// True when `addr` is a loopback address (127.0.0.0/8 or ::1).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// SIOCOUTQNSD (linux/sockios.h): bytes in a TCP socket's send queue not yet sent.
const SIOCOUTQNSD: libc::c_ulong = 0x894B;

/// Bytes written to the TCP socket `fd` that the kernel has not yet sent (SIOCOUTQNSD: data
/// sent but not acknowledged is not counted: it is already on the link). Falls back to
/// SIOCOUTQ (unsent plus unacknowledged) on kernels without SIOCOUTQNSD.
pub fn unsent_bytes(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQNSD writes one int to the pointer, which points at `n`; the fd is
    // borrowed, so it is open for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCOUTQNSD as _, &mut n) };
    if rc == 0 {
        return Ok(n.max(0) as u64);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOTTY) {
        return Err(e);
    }
    // SAFETY: as above, for SIOCOUTQ (= TIOCOUTQ), which also writes one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ as _, &mut n) };
    if rc == 0 {
        Ok(n.max(0) as u64)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A TCP connection's chrono counters (TCP_INFO, Linux 4.10+), microseconds since it opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpChrono {
    /// Time with data in flight or queued to send.
    pub busy_us: u64,
    /// Of which: limited by the receiver's window (the peer does not take data as fast as
    /// the link could carry it).
    pub rwnd_limited_us: u64,
    /// Of which: limited by our send buffer.
    pub sndbuf_limited_us: u64,
    /// Room left in the peer's advertised receive window, bytes: the window less what is in
    /// flight (unacknowledged segments × MSS). Linux 6.2+; `None` on older kernels.
    pub peer_window: Option<u32>,
}

/// The chrono counters of TCP socket `fd`; `Ok(None)` where the kernel does not report them.
pub fn tcp_chrono(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<Option<TcpChrono>> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is a plain C struct for which all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, which has that size, and
    // stores the length written in `len`; the fd is borrowed, so it is open.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // The counters are reported only by kernels whose struct reaches past them.
    let end = std::mem::offset_of!(libc::tcp_info, tcpi_sndbuf_limited) + 8;
    if (len as usize) < end {
        return Ok(None);
    }
    let wnd_end = std::mem::offset_of!(libc::tcp_info, tcpi_snd_wnd) + 4;
    Ok(Some(TcpChrono {
        busy_us: info.tcpi_busy_time,
        rwnd_limited_us: info.tcpi_rwnd_limited,
        sndbuf_limited_us: info.tcpi_sndbuf_limited,
        peer_window: ((len as usize) >= wnd_end).then(|| {
            let in_flight = u64::from(info.tcpi_unacked) * u64::from(info.tcpi_snd_mss);
            u64::from(info.tcpi_snd_wnd)
                .saturating_sub(in_flight)
                .try_into()
                .unwrap_or(u32::MAX)
        }),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    /// A peer that does not read: once its window is full, what we write stays unsent.
    #[test]
    fn unsent_bytes_counts_what_the_peer_has_not_taken() {
        let l = listen("127.0.0.1:0".parse().expect("addr")).expect("listen");
        let addr = l.local_addr().expect("addr");
        let mut c = connect(addr, &SocketOptions::default()).expect("connect");
        let (s, _) = l.accept().expect("accept");
        assert_eq!(unsent_bytes(c.as_fd()).expect("ioctl"), 0);
        c.set_nonblocking(true).expect("nonblocking");
        let buf = vec![7u8; 1 << 16];
        let mut written = 0u64;
        loop {
            match c.write(&buf) {
                Ok(n) => written += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("write: {e}"),
            }
        }
        let unsent = unsent_bytes(c.as_fd()).expect("ioctl");
        assert!(
            unsent > 0 && unsent <= written,
            "unsent {unsent} of {written} written"
        );
        // The peer's window is full: the connection has been receiver-limited.
        std::thread::sleep(std::time::Duration::from_millis(20));
        if let Some(ch) = tcp_chrono(c.as_fd()).expect("TCP_INFO") {
            assert!(ch.busy_us > 0, "{ch:?}");
            assert!(ch.rwnd_limited_us > 0, "{ch:?}");
            // ... and its advertised window has closed (kernels that report it).
            if let Some(w) = ch.peer_window {
                assert!(w < 64 << 10, "peer window {w} with the peer not reading");
            }
        }
        drop(s);
    }
}
