//! The front end's request reader (`cacheward::resp::frame::Requests`, hand-written) against the
//! maintained RESP decoder `redis-protocol` (its RESP2 `decode_bytes_mut`, the zero-copy path its
//! tokio codec uses), on the same bytes arriving in the same chunks as a socket delivers them:
//!
//!     cargo bench --bench resp_decode
//!
//! Both hand a server what it needs of each request: its arguments as `Bytes`, the frame checked
//! to be an array of bulk strings. Besides speed, what a server needs that the crate does not
//! give: Redis's inline requests (`PING\r\n`, which redis-cli and telnet users send) are not RESP
//! frames and it refuses them; a frame that is not finished is parsed again from its start at
//! every read (a 512 KiB argument arriving in 16 KiB reads is parsed 32 times); and a declared
//! length is not bounded before the bytes arrive (the front end refuses a request past
//! `socket.max_request_bytes` from its header). Prints ns per request and the ratio.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use cacheward::resp::frame::Requests;
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;

/// Bytes handed to the reader per "read", as a socket read into a 16 KiB buffer delivers them.
const CHUNK: usize = 16 * 1024;

/// `args` as a RESP request (an array of bulk strings).
fn request(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// One workload: a byte stream of `requests` requests.
struct Workload {
    name: &'static str,
    stream: Vec<u8>,
    requests: usize,
}

fn workloads() -> Vec<Workload> {
    let mut gets = Vec::new();
    for i in 0..100_000 {
        gets.extend(request(&[b"GET", format!("user:u{i}").as_bytes()]));
    }
    let mut mgets = Vec::new();
    for i in 0..2_000 {
        let keys: Vec<String> = (0..100)
            .map(|k| format!("accounts:{}", i * 100 + k))
            .collect();
        let mut args: Vec<&[u8]> = vec![b"MGET"];
        args.extend(keys.iter().map(|k| k.as_bytes()));
        mgets.extend(request(&args));
    }
    let mut big = Vec::new();
    let value = vec![b'x'; 512 * 1024];
    for _ in 0..20 {
        big.extend(request(&[b"ECHO", &value]));
    }
    vec![
        Workload {
            name: "GET user:uN, pipelined",
            stream: gets,
            requests: 100_000,
        },
        Workload {
            name: "MGET of 100 keys",
            stream: mgets,
            requests: 2_000,
        },
        Workload {
            name: "ECHO of 512 KiB",
            stream: big,
            requests: 20,
        },
    ]
}

/// The front end's reader over `stream`: requests and argument bytes seen.
fn ours(stream: &[u8]) -> (usize, usize) {
    let mut reader = Requests::new(1 << 30);
    let (mut requests, mut bytes) = (0, 0);
    for chunk in stream.chunks(CHUNK) {
        reader.spare().extend_from_slice(chunk);
        while let Some((args, _)) = reader.next_request().expect("valid") {
            requests += 1;
            bytes += args.iter().map(Bytes::len).sum::<usize>();
            reader.recycle(black_box(args));
        }
    }
    (requests, bytes)
}

/// redis-protocol over `stream`, each frame checked and turned into arguments as a server must.
fn theirs(stream: &[u8]) -> (usize, usize) {
    let mut buffer = BytesMut::with_capacity(CHUNK);
    let (mut requests, mut bytes) = (0, 0);
    for chunk in stream.chunks(CHUNK) {
        buffer.extend_from_slice(chunk);
        while let Some((frame, _, _)) = decode_bytes_mut(&mut buffer).expect("valid") {
            let BytesFrame::Array(items) = frame else {
                panic!("not a request")
            };
            let args: Vec<Bytes> = items
                .into_iter()
                .map(|item| match item {
                    BytesFrame::BulkString(b) => b,
                    _ => panic!("not a bulk string"),
                })
                .collect();
            requests += 1;
            bytes += args.iter().map(Bytes::len).sum::<usize>();
            black_box(args);
        }
    }
    (requests, bytes)
}

/// The best of several runs of `f` over `stream`, with what it read.
fn time(stream: &[u8], f: fn(&[u8]) -> (usize, usize)) -> (Duration, (usize, usize)) {
    let mut best = Duration::MAX;
    let mut seen = (0, 0);
    for _ in 0..7 {
        let start = Instant::now();
        seen = f(black_box(stream));
        best = best.min(start.elapsed());
    }
    (best, seen)
}

fn main() {
    println!(
        "{:<26} | {:>14} | {:>18} | {:>6}",
        "requests", "ours ns/req", "redis-protocol ns", "ratio"
    );
    for w in workloads() {
        let (mine, read) = time(&w.stream, ours);
        let (crate_time, crate_read) = time(&w.stream, theirs);
        assert_eq!(read, crate_read, "both read the same requests");
        assert_eq!(read.0, w.requests);
        let per = |d: Duration| d.as_nanos() as f64 / w.requests as f64;
        println!(
            "{:<26} | {:>14.1} | {:>18.1} | {:>5.2}x",
            w.name,
            per(mine),
            per(crate_time),
            crate_time.as_secs_f64() / mine.as_secs_f64()
        );
    }
    println!(
        "ratio: redis-protocol's time over the front end's reader's (above 1: ours is faster)"
    );
}
