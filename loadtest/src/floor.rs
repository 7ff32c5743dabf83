//! The machine's floor: what one `write()` of a small WebSocket frame costs on loopback TCP —
//! the cost a server pays per delivery when it writes each frame on its own, and which
//! coalescing several frames per write divides. `--sockets` loopback connections are drained
//! by tasks on the runtime; one thread writes a `--frame-bytes` unmasked text frame to each
//! socket in turn and reports its own CPU time per `write()` (the kernel's loopback path runs
//! the receiver's TCP processing in the writer's context, as it does for a server), then the
//! same with `--coalesce` frames per `write()`.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

#[derive(clap::Args, Clone, Debug)]
pub struct FloorArgs {
    /// Connected loopback sockets, written in turn.
    #[arg(long, default_value_t = 200)]
    pub sockets: usize,
    /// write() calls in each of the two measurements.
    #[arg(long, default_value_t = 200_000)]
    pub writes: u64,
    /// Bytes of one frame, its 2-byte WebSocket header included (a small chat message).
    #[arg(long, default_value_t = 120)]
    pub frame_bytes: usize,
    /// Frames per write() in the coalesced measurement.
    #[arg(long, default_value_t = 10)]
    pub coalesce: usize,
}

pub async fn floor(a: &FloorArgs) -> Result<Value> {
    if !(1..=2000).contains(&a.sockets) || !(1..=10_000_000).contains(&a.writes) {
        bail!("--sockets must be 1..=2000 and --writes 1..=10000000");
    }
    if !(3..=127).contains(&a.frame_bytes) || !(1..=100).contains(&a.coalesce) {
        bail!("--frame-bytes must be 3..=127 (a one-byte length) and --coalesce 1..=100");
    }
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut socks = Vec::with_capacity(a.sockets);
    let mut readers = Vec::with_capacity(a.sockets);
    for _ in 0..a.sockets {
        let client = TcpStream::connect(addr)?;
        let (server, _) = listener.accept()?;
        server.set_nodelay(true)?;
        client.set_nonblocking(true)?;
        readers.push(tokio::spawn(drain(tokio::net::TcpStream::from_std(
            client,
        )?)));
        socks.push(server);
    }
    let mut frame = vec![0x81, (a.frame_bytes - 2) as u8];
    frame.resize(a.frame_bytes, b'x');
    let (writes, coalesce) = (a.writes, a.coalesce);
    let (single, batched) = tokio::task::spawn_blocking(move || {
        let single = measure(&mut socks, &frame, writes)?;
        let batched = measure(&mut socks, &frame.repeat(coalesce), writes)?;
        anyhow::Ok((single, batched)) // the sockets close here: the readers see EOF
    })
    .await??;
    let mut read = 0;
    for r in readers {
        read += r.await??;
    }
    let rounds = a.sockets as u64 + a.writes;
    let written = rounds * a.frame_bytes as u64 * (1 + a.coalesce as u64);
    if read != written {
        bail!("the readers got {read} bytes of {written} written");
    }
    Ok(json!({
        "sockets": a.sockets,
        "frame_bytes": a.frame_bytes,
        "writes": a.writes,
        "cpu_us_per_write": single.cpu_us_per_write(),
        "wall_us_per_write": single.wall_us_per_write(),
        "coalesced": {
            "frames_per_write": a.coalesce,
            "cpu_us_per_write": batched.cpu_us_per_write(),
            "cpu_us_per_frame": (batched.cpu_us_per_write() / a.coalesce as f64 * 1000.0).round() / 1000.0,
            "wall_us_per_write": batched.wall_us_per_write(),
        },
        "bytes": written,
    }))
}

struct Measured {
    cpu_ns: u64,
    wall_ns: u64,
    calls: u64,
}

impl Measured {
    fn cpu_us_per_write(&self) -> f64 {
        (self.cpu_ns as f64 / self.calls as f64 / 10.0).round() / 100.0
    }
    fn wall_us_per_write(&self) -> f64 {
        (self.wall_ns as f64 / self.calls as f64 / 10.0).round() / 100.0
    }
}

/// `writes` writes of `buf`, round-robin over the sockets, after one warm-up round; counts the
/// write() calls (a full socket buffer splits one).
fn measure(socks: &mut [TcpStream], buf: &[u8], writes: u64) -> Result<Measured> {
    for s in socks.iter_mut() {
        s.write_all(buf)?;
    }
    let (cpu0, t0) = (thread_cpu_ns()?, Instant::now());
    let mut calls = 0;
    for i in 0..writes {
        let s = &mut socks[(i % socks.len() as u64) as usize];
        let mut off = 0;
        while off < buf.len() {
            off += s.write(&buf[off..])?;
            calls += 1;
        }
    }
    Ok(Measured {
        wall_ns: t0.elapsed().as_nanos() as u64,
        cpu_ns: thread_cpu_ns()? - cpu0,
        calls,
    })
}

/// This thread's time on a CPU, in ns (the first field of its schedstat).
fn thread_cpu_ns() -> Result<u64> {
    // The kernel adds up a running thread's time at ticks and when it is switched out:
    // blocking for a moment brings the figure up to date (and costs a few µs of CPU).
    std::thread::sleep(std::time::Duration::from_millis(1));
    let s = std::fs::read_to_string("/proc/thread-self/schedstat")
        .context("floor needs /proc/thread-self/schedstat")?;
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .context("unreadable /proc/thread-self/schedstat")
}

async fn drain(mut s: tokio::net::TcpStream) -> Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match s.read(&mut buf).await? {
            0 => return Ok(total),
            n => total += n as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(sockets: usize, frame_bytes: usize) -> FloorArgs {
        FloorArgs {
            sockets,
            writes: 2000,
            frame_bytes,
            coalesce: 10,
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn every_byte_written_is_read_and_each_write_costs_cpu() {
        let out = floor(&args(4, 120)).await.unwrap();
        assert_eq!(out["bytes"], json!((4 + 2000) * 120 * 11));
        assert!(out["cpu_us_per_write"].as_f64().unwrap() > 0.0, "{out}");
        let c = &out["coalesced"];
        let (per_write, per_frame) = (
            c["cpu_us_per_write"].as_f64().unwrap(),
            c["cpu_us_per_frame"].as_f64().unwrap(),
        );
        assert!(
            per_write > 0.0 && (per_frame - per_write / 10.0).abs() < 1e-9,
            "{out}"
        );
    }

    #[tokio::test]
    async fn frames_that_need_a_longer_header_are_refused() {
        let e = floor(&args(4, 200)).await.unwrap_err();
        assert!(e.to_string().contains("--frame-bytes"), "{e}");
        assert!(floor(&args(0, 120)).await.is_err());
    }
}
