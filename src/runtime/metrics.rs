//! The optional Prometheus endpoint (`metrics.listen`): the `stats` counters, backend state and the
//! CDC lag histogram in the text exposition format at `GET /metrics`. Off unless configured.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::cdc::stats::LAG_BUCKETS_MS;
use crate::service::{Backend, Service};

/// Metrics connections open at once; more wait to be accepted. Each costs a task and a few KiB,
/// and an idle one is closed after [`HEAD_TIMEOUT`]: many idle connections never hold up a
/// scrape.
const CONCURRENT_SCRAPES: usize = 256;
/// Longest request head read.
const MAX_REQUEST: usize = 8 * 1024;
/// How long a client may take to send its request head: an idle connection is closed after it.
const HEAD_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a whole exchange may take (writing the answer to a slow reader included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Samples with their label sets (`{table="accounts"}`).
type Labelled = Vec<(String, u64)>;

/// The exposition text.
pub fn render(service: &Service) -> String {
    let s = service.stats_report(false);
    let mut out = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let up = |b| u64::from(service.health.is_up(b));
    let plain: [(&str, &str, &str, u64); 32] = [
        (
            "cacheward_foreign_values_skipped_total",
            "counter",
            "Cache writes not made because the key held a value that is not cacheward's.",
            s.foreign_values_skipped,
        ),
        (
            "cacheward_stale_writes_refused_total",
            "counter",
            "Cache writes refused because Redis held a newer version.",
            s.stale_writes_refused,
        ),
        (
            "cacheward_fenced_writes_refused_total",
            "counter",
            "Live cache writes refused by a fence (read before it, or no usable fence).",
            s.fenced_writes_refused,
        ),
        (
            "cacheward_ready",
            "gauge",
            "1 once both backends were reached.",
            u64::from(service.health.ready()),
        ),
        (
            "cacheward_uptime_seconds",
            "gauge",
            "Seconds since the daemon started.",
            s.uptime_secs,
        ),
        (
            "cacheward_connections",
            "gauge",
            "Open client connections.",
            s.connections,
        ),
        (
            "cacheward_requests_total",
            "counter",
            "Requests received.",
            s.requests,
        ),
        (
            "cacheward_request_errors_total",
            "counter",
            "Requests answered with an error.",
            s.errors,
        ),
        (
            "cacheward_cache_hits_total",
            "counter",
            "Gets answered from Redis.",
            s.cache_hits,
        ),
        (
            "cacheward_cache_misses_total",
            "counter",
            "Gets that missed Redis.",
            s.cache_misses,
        ),
        (
            "cacheward_db_queries_total",
            "counter",
            "Queries the request path ran on PostgreSQL.",
            s.db_queries,
        ),
        (
            "cacheward_repairs_pending",
            "gauge",
            "Names whose Redis entry awaits repair.",
            s.repairs_pending,
        ),
        (
            "cacheward_near_cache_hits_total",
            "counter",
            "Gets answered from the near cache (also counted as cache hits).",
            s.near_cache.hits,
        ),
        (
            "cacheward_near_cache_entries",
            "gauge",
            "Entries the near cache holds.",
            s.near_cache.entries,
        ),
        (
            "cacheward_near_cache_bytes",
            "gauge",
            "Bytes the near cache holds (of cache.local_max_bytes).",
            s.near_cache.bytes,
        ),
        (
            "cacheward_near_cache_invalidations_total",
            "counter",
            "Near-cache names invalidated (by Redis, or by the daemon's own writes).",
            s.near_cache.invalidations,
        ),
        (
            "cacheward_near_cache_flushes_total",
            "counter",
            "Times the whole near cache was dropped (its invalidation channel not known intact).",
            s.near_cache.flushes,
        ),
        (
            "cacheward_near_cache_table_flushes_total",
            "counter",
            "Times one table's near-cache entries were dropped, the others' kept (its TRUNCATE).",
            s.near_cache.table_flushes,
        ),
        (
            "cacheward_resp_connections",
            "gauge",
            "Open connections to the Redis-protocol front end.",
            s.resp.connections,
        ),
        (
            "cacheward_resp_requests_total",
            "counter",
            "Commands the Redis-protocol front end received.",
            s.resp.requests,
        ),
        (
            "cacheward_resp_errors_total",
            "counter",
            "Front-end commands answered with an error.",
            s.resp.errors,
        ),
        (
            "cacheward_resp_tracking_clients",
            "gauge",
            "Front-end connections with CLIENT TRACKING on.",
            s.resp.tracking_clients,
        ),
        (
            "cacheward_resp_tracked_keys",
            "gauge",
            "Keys remembered for them (of resp.tracking_max_keys).",
            s.resp.tracked_keys,
        ),
        (
            "cacheward_resp_invalidations_total",
            "counter",
            "Invalidate messages owed to tracking clients.",
            s.resp.invalidations,
        ),
        (
            "cacheward_consistency_checked_total",
            "counter",
            "Cached entries the live checker compared with their rows.",
            s.consistency.checked,
        ),
        (
            "cacheward_consistency_mismatched_total",
            "counter",
            "Cached entries that differed from their rows beyond the convergence window.",
            s.consistency.mismatched,
        ),
        (
            "cacheward_consistency_oldest_mismatch_seconds",
            "gauge",
            "Age of the oldest mismatch still outstanding (0: none).",
            s.consistency.oldest_mismatch_ms / 1000,
        ),
        (
            "cacheward_cdc_applied_total",
            "counter",
            "Out-of-band changes applied to Redis.",
            s.cdc.applied,
        ),
        (
            "cacheward_cdc_batches_total",
            "counter",
            "CDC batches applied.",
            s.cdc.batches,
        ),
        (
            "cacheward_cdc_reconnects_total",
            "counter",
            "CDC connection retries.",
            s.cdc.reconnects,
        ),
        (
            "cacheward_cdc_resyncs_total",
            "counter",
            "CDC resyncs (every cached entry dropped).",
            s.cdc.resyncs,
        ),
        (
            "cacheward_cdc_missed_total",
            "counter",
            "Changes not written to a Redis primary that did not answer (read from PostgreSQL until repaired).",
            s.cdc.missed,
        ),
    ];
    for (name, kind, help, value) in plain {
        metric(name, kind, help, &[("", value)]);
    }
    let per_table = |pick: fn(&crate::service::stats::TableReport) -> u64| -> Vec<(String, u64)> {
        s.tables
            .iter()
            .map(|(name, t)| (format!("{{table=\"{name}\"}}"), pick(t)))
            .collect()
    };
    let tables: [(&str, &str, Labelled); 3] = [
        (
            "cacheward_table_cache_hits_total",
            "A declared table's gets answered from the cache.",
            per_table(|t| t.cache_hits),
        ),
        (
            "cacheward_table_cache_misses_total",
            "A declared table's gets that missed the cache.",
            per_table(|t| t.cache_misses),
        ),
        (
            "cacheward_table_writes_total",
            "A declared table's upserts, updates and deletes that reached PostgreSQL.",
            per_table(|t| t.writes),
        ),
    ];
    for (name, help, samples) in &tables {
        let samples: Vec<(&str, u64)> = samples.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(name, "counter", help, &samples);
    }
    let mut firing = vec![(
        "{table=\"users\"}".to_owned(),
        u64::from(service.users_capture_firing()),
    )];
    for name in service.tables.names() {
        let available = service
            .tables
            .id(name)
            .is_some_and(|id| !service.tables.is_unavailable(id));
        firing.push((format!("{{table=\"{name}\"}}"), u64::from(available)));
    }
    let firing: Vec<(&str, u64)> = firing.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        "cacheward_capture_firing",
        "gauge",
        "1 while the table's changes are captured (users' triggers fire; a declared table is available).",
        &firing,
    );
    metric(
        "cacheward_backend_up",
        "gauge",
        "1 while the backend answers.",
        &[
            ("{backend=\"postgres\"}", up(Backend::Postgres)),
            ("{backend=\"redis\"}", up(Backend::Redis)),
        ],
    );

    let cdc = &service.cdc;
    let name = "cacheward_cdc_lag_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} From a change's capture to its write to Redis.\n# TYPE {name} histogram"
    );
    let mut cumulative = 0;
    for (i, le) in LAG_BUCKETS_MS.iter().enumerate() {
        cumulative += cdc.lag_buckets[i].load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{}\"}} {cumulative}",
            *le as f64 / 1000.0
        );
    }
    cumulative += cdc.lag_buckets[LAG_BUCKETS_MS.len()].load(Relaxed);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(
        out,
        "{name}_sum {}",
        cdc.lag_sum_ms.load(Relaxed) as f64 / 1000.0
    );
    let _ = writeln!(out, "{name}_count {cumulative}");
    out
}

/// Serves `GET /metrics` until `stop`.
pub async fn serve(listener: TcpListener, service: Arc<Service>, stop: CancellationToken) {
    let permits = Arc::new(Semaphore::new(CONCURRENT_SCRAPES));
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            permit = permits.clone().acquire_owned() => permit.expect("never closed"),
        };
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let service = service.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &service)).await {
                tracing::debug!(error = %e, "metrics request timed out");
            }
            drop(permit);
        });
    }
}

/// Whether `head` holds the blank line that ends a request head, searching from `searched` (what
/// an earlier call looked at, less the three bytes a terminator may straddle), which it moves on.
fn ends_head(head: &[u8], searched: &mut usize) -> bool {
    let from = searched.saturating_sub(3);
    *searched = head.len();
    head[from..].windows(4).any(|w| w == b"\r\n\r\n")
}

async fn answer(mut stream: TcpStream, service: &Service) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let head_deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    // Only what arrived since the last look is searched (and the three bytes before it): a
    // client trickling its head a byte at a time costs linear work, not quadratic.
    let mut searched = 0;
    while !ends_head(&head, &mut searched) {
        let n = match tokio::time::timeout_at(head_deadline, stream.read(&mut buf)).await {
            Ok(read) => read?,
            // Idle: close it rather than hold a slot.
            Err(_) => return Ok(()),
        };
        if n == 0 || head.len() + n > MAX_REQUEST {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (status, body) = match (parts.next(), parts.next()) {
        (Some(b"GET"), Some(b"/metrics")) => ("200 OK", render(service)),
        (Some(b"GET"), _) => ("404 Not Found", "only /metrics is served\n".to_owned()),
        _ => ("405 Method Not Allowed", "only GET is served\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_trickled_a_byte_at_a_time_is_found_where_it_ends() {
        let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        let (mut head, mut searched) = (Vec::new(), 0);
        for (i, &byte) in request.iter().enumerate() {
            assert!(!ends_head(&head, &mut searched), "ended early, at {i}");
            head.push(byte);
        }
        assert!(ends_head(&head, &mut searched));
        // Split anywhere across two reads.
        for cut in 0..request.len() {
            let (mut head, mut searched) = (request[..cut].to_vec(), 0);
            assert!(!ends_head(&head, &mut searched));
            head.extend_from_slice(&request[cut..]);
            assert!(ends_head(&head, &mut searched), "cut at {cut}");
        }
    }
}
