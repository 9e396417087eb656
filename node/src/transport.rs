//! Every listener and every outgoing connection goes through here: mutual
//! TLS with the federation's certificates, or plain HTTP/2 on loopback in
//! the explicit `insecure` mode.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

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
const MAX_HANDSHAKES: usize = 64;

/// Checks a `host:port` peer address.
pub fn check_address(address: &str) -> Result<(), String> {
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
        loop {
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
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let sender = sender.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(handshake_timeout, tls.accept(tcp, peer)).await {
                    Ok(Ok(conn)) => {
                        let _ = sender.send(Ok(conn)).await;
                    }
                    Ok(Err(err)) => {
                        tracing::warn!(%peer, reason = %err, "TLS connection refused");
                    }
                    Err(_) => {
                        tracing::warn!(%peer, reason = "handshake timed out",
                            "TLS connection refused");
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
