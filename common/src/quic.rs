//! QUIC settings both ends share: windows and packet sizes are tuned for
//! throughput (many MiB in flight), and both ends must agree on them.

use std::sync::Arc;
use std::time::Duration;

/// Largest UDP payload over IPv4 (65535 minus the IP and UDP headers).
const MAX_UDP_PAYLOAD: u16 = 65_507;

/// Endpoint settings: accept datagrams up to the largest UDP payload, so
/// MTU discovery can go past Ethernet's 1500 bytes where the path allows
/// (loopback, jumbo-frame LANs), where fewer, larger packets cut the
/// per-packet work (crypto, acks, syscalls). Not measured on its own: it
/// went in with other push changes. Paths with a smaller MTU settle where
/// probes stop coming back; nothing is sent larger than what was confirmed.
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut e = quinn::EndpointConfig::default();
    e.max_udp_payload_size(MAX_UDP_PAYLOAD).expect("within QUIC's bounds");
    e
}

pub fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Windows sized for a loopback or LAN link carrying 1 MiB chunks on
    // many streams; memory per connection is bounded by these.
    t.max_concurrent_bidi_streams(64u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window((64u32 << 20).into());
    t.send_window(64 << 20);
    t.max_idle_timeout(Some(Duration::from_secs(60).try_into().expect("60s fits")));
    t.keep_alive_interval(Some(Duration::from_secs(10)));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// A tokio-driven endpoint on `socket` (a server when `server` is set).
pub fn endpoint(socket: std::net::UdpSocket, server: Option<quinn::ServerConfig>) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(endpoint_config(), server, socket, Arc::new(quinn::TokioRuntime))
}
