//! Reads a whole NBD export and throws the bytes away: the client's read throughput, for
//! `scripts/bench-nbd` (which times `nbdcopy` on the same export beside it).
//!
//!   nbd-read URI [CONNECTIONS [REQUEST_BYTES [IN_FLIGHT_PER_CONNECTION]]]

use futures::stream::{self, StreamExt, TryStreamExt};
use pilotlight_nbd::{Client, ConnectOptions, NbdUri};
use std::time::Instant;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let uri = NbdUri::parse(
        args.get(1)
            .ok_or("usage: nbd-read URI [CONNECTIONS [REQUEST_BYTES [IN_FLIGHT]]]")?,
    )?;
    let connections: usize = args.get(2).map_or(Ok(1), |s| s.parse())?;
    let request: u64 = args.get(3).map_or(Ok(4 << 20), |s| s.parse())?;
    let in_flight: usize = args.get(4).map_or(Ok(8), |s| s.parse())?;
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..connections.max(1) {
        clients.push(Client::connect(&uri, &ConnectOptions::default()).await?);
    }
    let size = clients[0].info().size;
    let request = request.min(u64::from(clients[0].max_read()));
    let offsets: Vec<u64> = (0..size).step_by(request as usize).collect();
    let n = clients.len();
    let total: u64 = stream::iter(offsets.into_iter().enumerate())
        .map(|(i, o)| {
            let c = &clients[i % n];
            let len = request.min(size - o) as usize;
            async move { c.read(o, len).await.map(|b| b.len() as u64) }
        })
        .buffer_unordered(in_flight * n)
        .try_fold(0u64, |a, b| async move { Ok(a + b) })
        .await?;
    let secs = started.elapsed().as_secs_f64();
    println!("{total} {secs:.3}");
    Ok(())
}
