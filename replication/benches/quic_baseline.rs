//! Raw QUIC on loopback: the baselines the sync bench compares itself to.
//!
//! `cargo bench -p fieldsync-replication --features quic --bench quic_baseline`
//!
//! Prints
//! `BASELINE name=quic_raw_stream mib_per_s=...` (one stream, 64 KiB writes) and
//! `BASELINE name=quic_round_trip_us p50=... p99=...` (100-byte request/response).

use fieldsync_replication::transport::baseline::{
    loopback_pair, percentile, raw_stream_throughput, round_trip_latencies,
};
use fieldsync_replication::transport::ConnectionLimits;

const STREAM_BYTES: u64 = 256 << 20;
const WRITE_BYTES: usize = 64 << 10;
const ROUND_TRIPS: usize = 20_000;
const PAYLOAD_BYTES: usize = 100;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Single-threaded, like the numbers in shared/reference/measured-costs.md.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        // The hub's own limits: the sync runs under them, so its baseline does too.
        let pair = loopback_pair(ConnectionLimits::hub()).await?;
        // Warm up (congestion window, allocations), then measure.
        raw_stream_throughput(&pair, 16 << 20, WRITE_BYTES).await?;
        let t = raw_stream_throughput(&pair, STREAM_BYTES, WRITE_BYTES).await?;
        println!(
            "BASELINE name=quic_raw_stream mib_per_s={:.1} us_per_64KiB={:.1}",
            t.mib_per_s(),
            t.us_per_64kib()
        );

        round_trip_latencies(&pair, 1_000, PAYLOAD_BYTES).await?;
        let rtts = round_trip_latencies(&pair, ROUND_TRIPS, PAYLOAD_BYTES).await?;
        let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
        println!(
            "BASELINE name=quic_round_trip_us p50={:.1} p99={:.1}",
            us(percentile(&rtts, 0.50)),
            us(percentile(&rtts, 0.99))
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
