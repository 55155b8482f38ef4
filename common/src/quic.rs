//! QUIC settings both ends share: windows and packet sizes are tuned for
//! throughput (many MiB in flight), and both ends must agree on them.

use std::sync::Arc;
use std::time::Duration;

/// How soon the peer is asked to acknowledge (see [`transport`]).
const MAX_ACK_DELAY: Duration = Duration::from_millis(1);

/// Silence after which a connection is dead. With 60 s, a client whose
/// server was killed and came straight back waited a minute to find out.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);

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

/// Streams and connection receive window of an established connection.
/// A server starts a connection with less (one stream, a small window)
/// and raises them to these once the peer's hello is authenticated.
pub const MAX_STREAMS: u32 = 64;
pub const RECEIVE_WINDOW: u32 = 64 << 20;

pub fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Windows sized for a loopback or LAN link carrying 1 MiB chunks on
    // many streams; memory per connection is bounded by these.
    t.max_concurrent_bidi_streams(MAX_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    // bkp sends no QUIC datagrams; quinn would otherwise buffer 1.25 MB of
    // them per connection, unread, for any peer that completed TLS.
    t.datagram_receive_buffer_size(None);
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window(RECEIVE_WINDOW.into());
    t.send_window(64 << 20);
    // A peer that went away (a killed or restarting server) is noticed
    // after IDLE_TIMEOUT of silence; keep-alives every KEEP_ALIVE keep a
    // quiet but live connection (a client reading a slow disk) well clear of it.
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("idle timeout fits")));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    // Ask the peer to acknowledge within 1 ms (QUIC's ack-frequency
    // extension; both ends are quinn). With the default 25 ms, a sender
    // early in slow start, with one large datagram in flight, waited for
    // the peer's delayed-ACK timer at every step: a dump restore showed
    // its first byte after ~190 ms and ended at ~400 ms; with 1 ms, first
    // byte ~60 ms, end ~270 ms. Busy paths ack every second packet anyway.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.max_ack_delay(Some(MAX_ACK_DELAY));
    t.ack_frequency_config(Some(ack));
    t
}

/// UDP socket buffers asked for. Linux's default (208 KiB) overflowed
/// when a restore's six fetch streams answered at once on loopback: the
/// kernel dropped datagrams (`RcvbufErrors` in /proc/net/snmp, 27 in one
/// dump restore, each one a retransmission and a congestion-window cut);
/// with 8 MiB asked for (4 MiB granted here), none. The kernel grants at
/// most `net.core.rmem_max` / `wmem_max`.
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// A tokio-driven endpoint on `socket` (a server when `server` is set),
/// with socket buffers of up to [`SOCKET_BUFFER_BYTES`]. Returns the
/// receive buffer the kernel granted too, so a server can say when the
/// system limit is too small.
pub fn endpoint(
    socket: std::net::UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<(quinn::Endpoint, usize)> {
    let s = socket2::SockRef::from(&socket);
    // Best effort: a smaller buffer still works, only with more drops.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    // Linux reports twice what it grants (the rest is its bookkeeping).
    let granted = s.recv_buffer_size().unwrap_or(0) / 2;
    let e = quinn::Endpoint::new(endpoint_config(), server, socket, Arc::new(quinn::TokioRuntime))?;
    Ok((e, granted))
}
