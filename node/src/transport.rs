//! Every listener and every outgoing connection goes through here, so that
//! mutual TLS is added in one place. For now: plain HTTP/2 on loopback.

use std::{net::SocketAddr, time::Duration};

use tokio::net::TcpListener;
use tonic::transport::{server::TcpIncoming, Channel, Endpoint};

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

/// Turns a bound listener into the server's connection stream.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// The address a listener is bound to.
pub fn local_address(listener: &TcpListener) -> std::io::Result<SocketAddr> {
    listener.local_addr()
}

/// Opens a client channel to `address` (`host:port`).
pub async fn connect(address: &str, timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    endpoint(address, timeout)?.connect().await
}

/// A client channel that connects on first use (and reconnects), so that
/// a call to a node that is not up yet fails as UNAVAILABLE and can be retried.
pub fn connect_lazy(address: &str, timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    Ok(endpoint(address, timeout)?.connect_lazy())
}

fn endpoint(address: &str, timeout: Duration) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20)))
}
