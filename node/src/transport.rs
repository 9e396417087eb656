//! Every listener and every outgoing connection goes through here: mutual
//! TLS with the federation's certificates, or plain HTTP/2 on loopback in
//! the explicit `insecure` mode.

use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, Semaphore},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    codegen::{http::Uri, Service},
    transport::{Channel, Endpoint},
};

use crate::{
    pki::Identity,
    tls::{Conn, Tls},
};

/// How connections are secured.
#[derive(Debug, Clone)]
pub enum Security {
    /// Plain HTTP/2, loopback only: every caller has every role.
    Insecure,
    /// Mutual TLS with this identity.
    Mutual(Arc<Tls>),
}

/// Handshakes running at once on one listener; more connections wait.
/// Sockets that never send a byte hold one each until the handshake
/// timeout: it takes `MAX_HANDSHAKES / MAX_HANDSHAKES_PER_SOURCE` sources
/// doing so to keep members waiting.
const MAX_HANDSHAKES: usize = 256;
/// Handshakes running at once from one source (an IPv4 address, or an
/// IPv6 /64); its other connections wait for one of them, so that a few
/// idle sockets cannot hold every slot and keep other members out.
const MAX_HANDSHAKES_PER_SOURCE: usize = 8;
/// Connections of one source handshaking or waiting to; more are closed
/// at once (bounding the sockets one source holds open before TLS).
const MAX_PENDING_PER_SOURCE: usize = 64;
/// Connections of all sources handshaking or waiting to: past this, the
/// listener accepts no more until one is done (the kernel's backlog holds
/// them), so sockets before TLS stay well below the file limit.
const MAX_PENDING: usize = 1024;

/// The source a connection counts against: its IPv4 address, or the /64
/// of its IPv6 address (one host may hold a whole /64).
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

/// At most one log line per second for a kind of event that can flood.
#[derive(Default)]
struct LogThrottle(Mutex<(Option<std::time::Instant>, u64)>);

impl LogThrottle {
    /// Whether an event at `now` gets its line: then, how many since the
    /// last line did not.
    fn admit(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (last, unlogged) = &mut *state;
        match last {
            Some(at) if now.duration_since(*at) < Duration::from_secs(1) => {
                *unlogged += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(unlogged))
            }
        }
    }
}

/// Per source: its handshake permits, and its connections pending.
#[derive(Default)]
struct Sources(Mutex<HashMap<IpAddr, (Arc<Semaphore>, usize)>>);

/// A pending connection of a source, counted until dropped.
struct SourceSlot {
    sources: Arc<Sources>,
    source: IpAddr,
    /// The source's handshake permits.
    handshakes: Arc<Semaphore>,
}

impl Sources {
    /// Counts a connection from `peer`, unless its source has too many.
    fn take(self: &Arc<Self>, peer: SocketAddr) -> Option<SourceSlot> {
        let source = source_of(peer.ip());
        let mut pending = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (handshakes, count) = pending
            .entry(source)
            .or_insert_with(|| (Arc::new(Semaphore::new(MAX_HANDSHAKES_PER_SOURCE)), 0));
        if *count >= MAX_PENDING_PER_SOURCE {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            sources: self.clone(),
            source,
            handshakes: handshakes.clone(),
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut pending = self
            .sources
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, count)) = pending.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                pending.remove(&self.source);
            }
        }
    }
}

/// Longest peer address: a host name of 253 bytes (DNS's most), or a
/// bracketed IPv6 address with its zone, and a port.
pub const MAX_ADDRESS_LEN: usize = 260;

/// Checks a `host:port` peer address.
pub fn check_address(address: &str) -> Result<(), String> {
    if address.len() > MAX_ADDRESS_LEN {
        return Err(format!(
            "{} bytes, longer than {MAX_ADDRESS_LEN} (a host name has at most 253)",
            address.len()
        ));
    }
    if let Some(bad) = address
        .chars()
        .find(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!("{address:?} holds {bad:?}, which no host:port has"));
    }
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("{address:?} is not host:port"))?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!(
            "{address:?} is not host:port with a port from 1 to 65535"
        ));
    }
    Ok(())
}

/// Binds the server's listener.
pub async fn bind(address: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// The address a listener is bound to.
pub fn local_address(listener: &TcpListener) -> std::io::Result<SocketAddr> {
    listener.local_addr()
}

/// Bytes a caller may send on one stream before the node has read them
/// (the HTTP/2 stream window the node advertises).
///
/// h2 closes a whole connection (GOAWAY ENHANCE_YOUR_CALM,
/// "too_many_data_frames") once small DATA frames waiting to be read
/// cost more than half its connection window, each frame of `p` bytes
/// under 256 costing `256 - p`. A publish stream of one-row requests
/// (about 60 bytes each, a frame each when sent one at a time) that runs
/// ahead of the node fills its window with them: flow control must stop
/// the caller before that cost does. One full window of 60-byte frames
/// costs about 3 times the window (of 25-byte frames, 9 times), so this
/// window against [`CONNECTION_WINDOW`] leaves room for about 5 such
/// streams per connection. hyper's default of 1 MiB for both windows left
/// room for less than one.
pub const STREAM_WINDOW: u32 = 128 << 10;
/// Bytes a caller may send on all its streams of one connection before
/// the node has read them (the HTTP/2 connection window): 4 MiB, which
/// also bounds what one connection can make the node buffer.
pub const CONNECTION_WINDOW: u32 = 4 << 20;
/// Streams open at once on one connection, at most (HTTP/2's
/// SETTINGS_MAX_CONCURRENT_STREAMS); a caller waits for one to end.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;

/// The node's gRPC server: its HTTP/2 windows and stream limit (see
/// [`STREAM_WINDOW`]) and keepalive pings, so a connection whose peer
/// vanished (a cut without a FIN) is closed and releases its streams.
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
}

/// Turns a bound listener into the server's stream of connections, each
/// authenticated (TLS) before it is yielded. A refused handshake is
/// logged with the peer's address and the reason, and never reaches the
/// services.
pub fn incoming(
    listener: TcpListener,
    security: Security,
    handshake_timeout: Duration,
) -> ReceiverStream<std::io::Result<Conn>> {
    let (sender, receiver) = mpsc::channel(16);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let sources = Arc::new(Sources::default());
        let pending = Arc::new(Semaphore::new(MAX_PENDING));
        let timeouts = Arc::new(LogThrottle::default());
        loop {
            let Ok(admitted) = pending.clone().acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                () = sender.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accepting a connection failed");
                    // Out of file descriptors, say: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let tls = match &security {
                Security::Insecure => {
                    if sender.send(Ok(Conn::plain(tcp, peer))).await.is_err() {
                        return;
                    }
                    continue;
                }
                Security::Mutual(tls) => tls.clone(),
            };
            let Some(slot) = sources.take(peer) else {
                // Not logged each time: a flood would flood the log too.
                tracing::debug!(%peer, "connection closed: its address has too many pending");
                continue;
            };
            let (sender, handshakes, timeouts) =
                (sender.clone(), handshakes.clone(), timeouts.clone());
            // Waiting for a permit of its source, then of the listener,
            // counts against the handshake timeout: a connection that never
            // sends a byte is closed in time, waiting or not.
            tokio::spawn(async move {
                let _admitted = admitted;
                let handshake = async {
                    let _own = slot.handshakes.clone().acquire_owned().await.ok()?;
                    let _any = handshakes.acquire_owned().await.ok()?;
                    Some(tls.accept(tcp, peer).await)
                };
                let outcome = tokio::time::timeout(handshake_timeout, handshake).await;
                drop(slot);
                match outcome {
                    Ok(Some(Ok(conn))) => {
                        let _ = sender.send(Ok(conn)).await;
                    }
                    Ok(Some(Err(err))) => {
                        tracing::warn!(%peer, reason = %err, "TLS connection refused");
                    }
                    // The listener is closing.
                    Ok(None) => {}
                    Err(_) => {
                        // Idle sockets can come by the thousand: one line
                        // a second at most, counting the ones left out.
                        if let Some(unlogged) = timeouts.admit(std::time::Instant::now()) {
                            tracing::warn!(%peer, reason = "handshake timed out",
                                also_timed_out_since_last_line = unlogged,
                                "TLS connection refused");
                        }
                    }
                }
            });
        }
    });
    ReceiverStream::new(receiver)
}

/// Opens a client channel to `address` (`host:port`), expecting the
/// identity `expected` there (any node when `None`).
pub async fn connect(
    address: &str,
    security: &Security,
    expected: Option<Identity>,
    timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    endpoint(address, timeout)?
        .connect_with_connector(Connector::new(address, security, expected))
        .await
}

/// A client channel that connects on first use (and reconnects), so that
/// a call to a node that is not up yet fails as UNAVAILABLE and can be retried.
pub fn connect_lazy(
    address: &str,
    security: &Security,
    expected: Option<Identity>,
    timeout: Duration,
) -> Result<Channel, tonic::transport::Error> {
    Ok(endpoint(address, timeout)?
        .connect_with_connector_lazy(Connector::new(address, security, expected)))
}

/// An error and its causes, on one line: transport errors keep the reason
/// (a refused certificate, say) in their sources.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn endpoint(address: &str, timeout: Duration) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20)))
}

/// Dials `address` and secures the connection.
#[derive(Clone)]
struct Connector {
    address: Arc<str>,
    security: Security,
    expected: Option<Identity>,
}

impl Connector {
    fn new(address: &str, security: &Security, expected: Option<Identity>) -> Self {
        Self {
            address: address.into(),
            security: security.clone(),
            expected,
        }
    }
}

type Connecting = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<Conn>>> + Send>>;

impl Service<Uri> for Connector {
    type Response = TokioIo<Conn>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&*this.address).await?;
            tcp.set_nodelay(true)?;
            let conn = match &this.security {
                Security::Insecure => {
                    let peer = tcp.peer_addr()?;
                    Conn::plain(tcp, peer)
                }
                Security::Mutual(tls) => tls.connect(tcp, this.expected.clone()).await?,
            };
            Ok(TokioIo::new(conn))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_timeouts_logs_a_line_a_second() {
        let throttle = LogThrottle::default();
        let start = std::time::Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(throttle.admit(at(0)), Some(0));
        assert_eq!(throttle.admit(at(10)), None);
        assert_eq!(throttle.admit(at(999)), None);
        assert_eq!(throttle.admit(at(1000)), Some(2));
        assert_eq!(throttle.admit(at(5000)), Some(0));
    }

    #[test]
    fn handshakes_count_per_source_and_are_given_back() {
        let v6 = |text: &str| IpAddr::V6(text.parse().unwrap());
        assert_eq!(source_of(v6("2001:db8:1:2:aaaa::1")), v6("2001:db8:1:2::"));
        assert_eq!(
            source_of(v6("::ffff:192.0.2.7")),
            IpAddr::V4("192.0.2.7".parse().unwrap())
        );
        let sources = Arc::new(Sources::default());
        let from = |text: &str| -> SocketAddr { text.parse().unwrap() };
        let slots: Vec<SourceSlot> = (0..MAX_PENDING_PER_SOURCE)
            .map(|port| {
                sources
                    .take(from(&format!("192.0.2.7:{}", 1000 + port)))
                    .unwrap()
            })
            .collect();
        assert!(
            sources.take(from("192.0.2.7:2000")).is_none(),
            "one source held more"
        );
        assert!(
            sources.take(from("192.0.2.8:2000")).is_some(),
            "another source was refused"
        );
        // A source's connections share its handshake permits.
        assert!(Arc::ptr_eq(&slots[0].handshakes, &slots[1].handshakes));
        assert_eq!(
            slots[0].handshakes.available_permits(),
            MAX_HANDSHAKES_PER_SOURCE
        );
        drop(slots);
        assert!(
            sources.take(from("192.0.2.7:2000")).is_some(),
            "slots were not given back"
        );
        assert_eq!(
            sources.0.lock().unwrap().len(),
            0,
            "a source stayed counted"
        );
    }
}
