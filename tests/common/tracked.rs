//! A Redis client caching on its side, as redis-py's client-side cache does, for the soaks:
//! `CLIENT TRACKING ON` over RESP3 on the daemon's Redis-protocol socket, a `GET` answered from
//! its own memory while no `invalidate` push named the key, every push it has received applied
//! before it serves from memory, everything dropped when the connection goes. Every answer, its
//! own memory's included, is handed to the soak, which holds it to the commit history.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use super::history::{now_us, Rng};

/// One RESP3 frame as the tracked client reads it.
pub enum Frame {
    Push(Vec<Frame>),
    Array(Vec<Frame>),
    Bulk(String),
    Nil,
    Other,
}

impl Frame {
    /// The keys an `invalidate` push names: `Some(None)` for all of them (a flush), `None` when
    /// this is not one.
    pub fn invalidated(self) -> Option<Option<Vec<String>>> {
        let Frame::Push(mut parts) = self else {
            return None;
        };
        match parts.pop() {
            Some(Frame::Array(keys)) => Some(Some(
                keys.into_iter()
                    .filter_map(|k| match k {
                        Frame::Bulk(k) => Some(k),
                        _ => None,
                    })
                    .collect(),
            )),
            _ => Some(None),
        }
    }
}

/// Reads one RESP3 frame; `None` when the connection fails.
pub fn read_frame<'a>(
    r: &'a mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<Frame>> + Send + 'a>> {
    Box::pin(async move {
        let mut line = String::new();
        if r.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let line = line.trim_end_matches("\r\n");
        let (kind, rest) = line.split_at(1);
        let n: i64 = rest.parse().unwrap_or(0);
        Some(match kind {
            "$" if n >= 0 => {
                let mut buf = vec![0u8; n as usize + 2];
                tokio::io::AsyncReadExt::read_exact(r, &mut buf)
                    .await
                    .ok()?;
                Frame::Bulk(String::from_utf8_lossy(&buf[..n as usize]).into_owned())
            }
            "$" | "_" => Frame::Nil,
            ">" | "*" | "%" | "~" => {
                let count = if kind == "%" { 2 * n } else { n };
                let mut items = Vec::new();
                for _ in 0..count {
                    items.push(read_frame(r).await?);
                }
                match kind {
                    ">" => Frame::Push(items),
                    _ => Frame::Array(items),
                }
            }
            _ => Frame::Other,
        })
    })
}

/// One answer of a tracked client: the key, when it was asked and answered (the same moment
/// for its own memory's), what the answer showed, and where it came from (`resp` or
/// `client cache`).
pub struct Answer<'a, T> {
    pub key: &'a str,
    pub sent_us: i64,
    pub answered_us: i64,
    pub shown: &'a T,
    pub source: &'static str,
}

/// Runs a tracked client until `stop`, reconnecting when the daemon goes: `pick` names the Redis
/// key to read next, `read` tells what a reply shows (`None`: no claim about the data, such as
/// an error while a backend is down; nothing is cached then), `record` takes every answer.
pub async fn tracked_client<T: Clone>(
    socket: PathBuf,
    mut rng: Rng,
    stop: CancellationToken,
    mut pick: impl FnMut(&mut Rng) -> String,
    read: impl Fn(Frame) -> Option<T>,
    mut record: impl FnMut(Answer<'_, T>),
) {
    while !stop.is_cancelled() {
        let Ok(stream) = UnixStream::connect(&socket).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let (r, mut w) = stream.into_split();
        let (frames, mut heard) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let mut r = BufReader::new(r);
            while let Some(frame) = read_frame(&mut r).await {
                if frames.send(frame).is_err() {
                    break;
                }
            }
        });
        if w.write_all(b"HELLO 3\r\nCLIENT TRACKING ON\r\n")
            .await
            .is_err()
        {
            continue;
        }
        // The two replies.
        let mut handshake = 0;
        while handshake < 2 {
            match tokio::time::timeout(Duration::from_secs(15), heard.recv()).await {
                Ok(Some(Frame::Push(_))) => {}
                Ok(Some(_)) => handshake += 1,
                _ => break,
            }
        }
        if handshake < 2 {
            reader.abort();
            continue;
        }
        let mut cache: HashMap<String, T> = HashMap::new();
        let apply = |cache: &mut HashMap<String, T>, keys: Option<Vec<String>>| match keys {
            Some(keys) => {
                for key in keys {
                    cache.remove(&key);
                }
            }
            None => cache.clear(),
        };
        'connection: while !stop.is_cancelled() {
            // Pushes first, as redis-py reads them before it serves from its cache.
            loop {
                match heard.try_recv() {
                    Ok(frame) => {
                        if let Some(keys) = frame.invalidated() {
                            apply(&mut cache, keys);
                        }
                    }
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                    Err(_) => break 'connection,
                }
            }
            let key = pick(&mut rng);
            if let Some(held) = cache.get(&key) {
                let now = now_us();
                record(Answer {
                    key: &key,
                    sent_us: now,
                    answered_us: now,
                    shown: held,
                    source: "client cache",
                });
            } else {
                let sent_us = now_us();
                let request = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
                if w.write_all(request.as_bytes()).await.is_err() {
                    break;
                }
                let reply = loop {
                    match tokio::time::timeout(Duration::from_secs(15), heard.recv()).await {
                        Ok(Some(frame @ Frame::Push(_))) => {
                            apply(&mut cache, frame.invalidated().expect("a push"))
                        }
                        Ok(Some(reply)) => break reply,
                        _ => break 'connection,
                    }
                };
                let answered_us = now_us();
                let Some(shown) = read(reply) else { continue };
                record(Answer {
                    key: &key,
                    sent_us,
                    answered_us,
                    shown: &shown,
                    source: "resp",
                });
                cache.insert(key, shown);
            }
            tokio::time::sleep(Duration::from_micros(rng.below(3000))).await;
        }
        reader.abort();
    }
}
