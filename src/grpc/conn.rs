//! A caller connection as leaderlink serves it: the accepted socket (or TLS stream) in one
//! wrapper that keeps its idle timeout ([`super::idle`]) and its abuse watch ([`super::abuse`]),
//! and gives tonic its [`ConnInfo`].
//!
//! Both end the connection the same way: its read side reports the end of the stream, so that
//! HTTP/2 ends it as if the caller had closed it (tonic has no handle on a single connection).

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use super::{
    abuse::{Penalties, Watch},
    idle::{Activity, ConnInfo, IdleClock},
};

/// An accepted caller connection (see the module docs).
pub struct CallerIo<IO> {
    inner: IO,
    peer: Option<SocketAddr>,
    /// The connection's calls, counted by [`super::idle::IdleLayer`].
    activity: Arc<Activity>,
    /// `None`: no idle timeout.
    idle: Option<IdleClock>,
    /// `None`: not watched (the penalty is off).
    watch: Option<Watch>,
    /// Judged abusive (penalized once): its read side has ended.
    abusive: bool,
}

impl<IO> CallerIo<IO> {
    /// Wraps `inner`, a connection from `peer`: closed after `idle_timeout` without a call
    /// (`None`: never), and watched for abuse when `penalties` is given, allowing for up to
    /// `max_concurrent_streams` open streams.
    pub fn new(
        inner: IO,
        peer: Option<SocketAddr>,
        idle_timeout: Option<Duration>,
        penalties: Option<Arc<Penalties>>,
        max_concurrent_streams: u32,
    ) -> Self {
        let activity = Arc::new(Activity::new());
        Self {
            inner,
            peer,
            idle: idle_timeout.map(IdleClock::new),
            watch: penalties.map(|p| Watch::new(p, activity.clone(), max_concurrent_streams)),
            activity,
            abusive: false,
        }
    }

    /// The connection was judged abusive for `cause`: penalized, once. True the first time.
    fn abused(&mut self, cause: &'static str) -> bool {
        if self.abusive {
            return false;
        }
        self.abusive = true;
        if let Some(w) = &self.watch {
            w.penalize(self.peer, cause);
        }
        true
    }

    /// Follows bytes leaderlink just wrote; true when they made the connection abusive.
    fn written(&mut self, written: &[u8]) -> bool {
        match self.watch.as_mut().and_then(|w| w.written(written)) {
            Some(cause) => self.abused(cause),
            None => false,
        }
    }
}

impl<IO> Connected for CallerIo<IO> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo::new(self.peer, self.activity.clone())
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for CallerIo<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.abusive {
            return Poll::Ready(Ok(()));
        }
        let filled = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => {}
            ready => {
                let read = &buf.filled()[filled..];
                if !read.is_empty() {
                    if let Some(idle) = &mut this.idle {
                        idle.read();
                    }
                    if let Some(cause) = this.watch.as_mut().and_then(|w| w.read(read)) {
                        this.abused(cause);
                    }
                }
                return ready;
            }
        }
        match &mut this.idle {
            // The end of the stream: the connection ends as if the caller had closed it.
            Some(idle) => idle
                .poll_expired(&this.activity, this.peer, cx)
                .map(|()| Ok(())),
            None => Poll::Pending,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for CallerIo<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r
            && this.written(&buf[..n])
        {
            // The read side ends now; HTTP/2 reads and writes in the same task.
            cx.waker().wake_by_ref();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r
            && this.watch.is_some()
        {
            let mut left = n;
            let mut abusive = false;
            for b in bufs {
                if left == 0 {
                    break;
                }
                let k = left.min(b.len());
                abusive |= this.written(&b[..k]);
                left -= k;
            }
            if abusive {
                cx.waker().wake_by_ref();
            }
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
