//! Shards read over HTTP(S) by range requests (design §15).
//!
//! A remote shard is mapped like a local one, over an anonymous in-memory file (`memfd`) of
//! the shard's size that holds no memory until bytes are written to it: its header is fetched
//! and validated as a local header is, and a pass fetches each work item's stretches into it
//! before the item is read ([`Remote::ensure`]), the readers of [`crate::readahead`] fetching
//! ahead of the workers with several requests in flight per file. Behind the pass the bytes
//! are dropped again ([`Remote::release`]: a hole punched into the file), so what a pass holds
//! is bounded by the readers' window, never by the checkpoint.
//!
//! Every response is checked: a range answered with the whole file (a server that ignores
//! `Range`) is refused before its body is read, the size in `Content-Range` and the `ETag`
//! must stay those seen when the shard was opened (else the file changed while it was read),
//! transient failures (connections dropped or reset, timeouts, 408, 429, 5xx) are retried
//! with backoff from where the last attempt stopped, and 401/403/404 are one-line errors that
//! say what to do. Messages name the URL without its query or credentials.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};

/// Attempts of one request before a transient failure becomes an error.
const ATTEMPTS: u32 = 6;
/// Backoff before the second attempt; doubled before each later one (0.25 s to 4 s).
const BACKOFF: Duration = Duration::from_millis(250);
/// Bytes fetched by the first request of a shard: the header of most checkpoints.
const FIRST: usize = 1 << 16;
/// Body bytes copied into the file at a time (between checks of the pass's stop flag).
const PIECE: usize = 1 << 18;
/// Largest index file accepted (the header limit of a safetensors file).
const MAX_INDEX: u64 = 100_000_000;

/// Requests in flight per remote file while a pass reads it (the readers of
/// [`crate::readahead`]): enough to fill a link whose round trips are long next to a read.
pub const STREAMS: usize = 16;

/// How a pass says it stopped (an error elsewhere, Ctrl-C): checked while waiting and between
/// pieces of a body.
pub type Halt<'a> = &'a (dyn Fn() -> bool + Sync);

/// An HTTP client for one checkpoint's files: a connection pool and the headers sent with
/// every request (authorisation, user agent), never shown.
pub struct Client {
    agent: ureq::Agent,
    headers: Vec<(String, String)>,
}

impl Client {
    /// A client sending `headers` with every request.
    pub fn new(headers: Vec<(String, String)>) -> Arc<Client> {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .max_idle_connections_per_host(4 * STREAMS)
            .max_idle_connections(16 * STREAMS)
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
            .user_agent(concat!("rlmask/", env!("CARGO_PKG_VERSION")))
            .build();
        Arc::new(Client {
            agent: config.new_agent(),
            headers,
        })
    }

    /// A GET of `url` (of `range`, when given), with the client's headers; without its
    /// `Authorization` when `url` is on another host than `origin` (a location a redirect led
    /// to, asked directly: a CDN never gets the hub token).
    fn get(
        &self,
        url: &str,
        origin: &str,
        range: Option<(usize, usize)>,
    ) -> std::result::Result<Reply, Fail> {
        let mut req = self.agent.get(url);
        let foreign = authority(url) != authority(origin);
        for (k, v) in &self.headers {
            if foreign && k.eq_ignore_ascii_case("authorization") {
                continue;
            }
            req = req.header(k.as_str(), v.as_str());
        }
        if let Some((start, end)) = range {
            req = req.header("Range", format!("bytes={start}-{}", end - 1));
        }
        let resp = req.call().map_err(|e| match e {
            ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::Protocol(_)
            | ureq::Error::BodyStalled => Fail::Transient(e.to_string()),
            ureq::Error::HostNotFound => Fail::Fatal(Kind::Remote, "host not found".into()),
            e => Fail::Fatal(Kind::Remote, e.to_string()),
        })?;
        Ok(Reply(resp))
    }
}

/// `scheme://host:port` of a URL (what decides whether credentials may go to it).
fn authority(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    let end = url[after..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| after + i);
    &url[..end]
}

/// One response.
struct Reply(ureq::http::Response<ureq::Body>);

impl Reply {
    fn status(&self) -> u16 {
        self.0.status().as_u16()
    }

    /// The URL that answered, after any redirects.
    fn location(&self) -> String {
        use ureq::ResponseExt;
        self.0.get_uri().to_string()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.0.headers().get(name).and_then(|v| v.to_str().ok())
    }

    /// `Content-Range: bytes START-LAST/TOTAL` as (start, end, total).
    fn content_range(&self) -> Option<(usize, usize, usize)> {
        let v = self.header("content-range")?.strip_prefix("bytes ")?;
        let (span, total) = v.split_once('/')?;
        let (a, b) = span.split_once('-')?;
        let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
        Some((a, b.checked_add(1)?, total.trim().parse().ok()?))
    }
}

/// What kind of error a failure becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    NotFound,
    Changed,
    Remote,
    Cancelled,
}

/// A failed request: worth another attempt, or not.
#[derive(Debug)]
enum Fail {
    Transient(String),
    Fatal(Kind, String),
}

/// A status that is not the one asked for, as a failure that says what to do.
fn status_failure(status: u16) -> Fail {
    match status {
        401 | 403 => Fail::Fatal(
            Kind::Remote,
            format!(
                "access denied (HTTP {status}): for a gated or private model, accept its terms \
                 on the hub and set HF_TOKEN (or `hf auth login`) to a token that may read it"
            ),
        ),
        404 | 410 => Fail::Fatal(
            Kind::NotFound,
            format!(
                "not found (HTTP {status}): check the repository name, the revision and the \
                 file name"
            ),
        ),
        416 => Fail::Fatal(
            Kind::Changed,
            "the server refused the byte range (HTTP 416): the file is shorter than when it \
             was opened"
                .into(),
        ),
        408 | 425 | 429 | 500..=599 => Fail::Transient(format!("HTTP {status}")),
        _ => Fail::Fatal(Kind::Remote, format!("unexpected HTTP {status}")),
    }
}

fn to_error(shown: &Path, kind: Kind, reason: String) -> Error {
    let path = shown.to_path_buf();
    match kind {
        Kind::NotFound => Error::NotFound { path, reason },
        Kind::Changed => Error::Changed { path, reason },
        Kind::Remote => Error::Remote { path, reason },
        Kind::Cancelled => Error::Cancelled,
    }
}

/// `url` as it may be shown: without credentials, query or fragment (a signed URL's query is
/// a credential).
pub fn shown_url(url: &str) -> String {
    let cut = url.find(['?', '#']).unwrap_or(url.len());
    let url = &url[..cut];
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host_end = rest.find('/').unwrap_or(rest.len());
            let host = &rest[..host_end];
            let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
            format!("{scheme}://{host}{}", &rest[host_end..])
        }
        None => url.to_string(),
    }
}

/// Runs `attempt` until it succeeds, fails for good, or has failed transiently [`ATTEMPTS`]
/// times, sleeping with doubling backoff between attempts (and stopping when `halt` says so).
fn retry<T>(
    halt: Halt,
    mut attempt: impl FnMut() -> std::result::Result<T, Fail>,
) -> std::result::Result<T, (Kind, String)> {
    let mut wait = BACKOFF;
    for n in 1.. {
        if halt() {
            return Err((Kind::Cancelled, String::new()));
        }
        match attempt() {
            Ok(v) => return Ok(v),
            Err(Fail::Fatal(kind, why)) => return Err((kind, why)),
            Err(Fail::Transient(why)) if n >= ATTEMPTS => {
                return Err((Kind::Remote, format!("{why} (after {n} attempts)")))
            }
            Err(Fail::Transient(_)) => {
                let until = std::time::Instant::now() + wait;
                while std::time::Instant::now() < until {
                    if halt() {
                        return Err((Kind::Cancelled, String::new()));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                wait *= 2;
            }
        }
    }
    unreachable!("the loop returns")
}

/// A small file fetched whole (an index), or `None` when the server has no such file.
pub fn fetch_small(client: &Client, url: &str) -> Result<Option<Vec<u8>>> {
    let shown = PathBuf::from(shown_url(url));
    let never = || false;
    let got = retry(&never, || {
        let mut reply = client.get(url, url, None)?;
        match reply.status() {
            200 => {}
            404 | 410 => return Ok(None),
            s => return Err(status_failure(s)),
        }
        let mut body = Vec::new();
        reply
            .0
            .body_mut()
            .as_reader()
            .take(MAX_INDEX + 1)
            .read_to_end(&mut body)
            .map_err(|e| Fail::Transient(e.to_string()))?;
        if body.len() as u64 > MAX_INDEX {
            return Err(Fail::Fatal(
                Kind::Remote,
                format!("larger than {MAX_INDEX} bytes: not an index file"),
            ));
        }
        Ok(Some(body))
    });
    got.map_err(|(k, why)| to_error(&shown, k, why))
}

/// Ranges of a file, as disjoint, non-adjacent `[start, end)` spans.
#[derive(Default, Debug)]
struct Spans(BTreeMap<usize, usize>);

impl Spans {
    /// Whether `[a, b)` lies inside one span.
    fn covers(&self, a: usize, b: usize) -> bool {
        a >= b
            || self
                .0
                .range(..=a)
                .next_back()
                .is_some_and(|(_, &end)| end >= b)
    }

    /// The parts of `[a, b)` that no span holds, in order.
    fn gaps(&self, a: usize, b: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        if a >= b {
            return out;
        }
        let mut at = a;
        let first = self.0.range(..=a).next_back().map(|(&s, &e)| (s, e));
        for (s, e) in first
            .into_iter()
            .chain(self.0.range(a + 1..b).map(|(&s, &e)| (s, e)))
        {
            if e <= at {
                continue;
            }
            if s > at {
                out.push((at, s.min(b)));
            }
            at = at.max(e);
            if at >= b {
                break;
            }
        }
        if at < b {
            out.push((at, b));
        }
        out
    }

    /// Adds `[a, b)`, merging it with the spans it touches.
    fn insert(&mut self, a: usize, b: usize) {
        if a >= b {
            return;
        }
        let (mut start, mut end) = (a, b);
        let touching: Vec<(usize, usize)> = self
            .0
            .range(..=b)
            .rev()
            .take_while(|(_, &e)| e >= a)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.0.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    /// Removes `[a, b)`.
    fn remove(&mut self, a: usize, b: usize) {
        if a >= b {
            return;
        }
        let hit: Vec<(usize, usize)> = self
            .0
            .range(..b)
            .rev()
            .take_while(|(_, &e)| e > a)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in hit {
            self.0.remove(&s);
            if s < a {
                self.0.insert(s, a);
            }
            if e > b {
                self.0.insert(b, e);
            }
        }
    }
}

/// What is known of a remote file's bytes.
#[derive(Default)]
struct Ranges {
    /// Fetched and not released.
    done: Spans,
    /// Being fetched by some thread.
    busy: Spans,
    /// Kept however the pass releases around them (scales read by every worker, views handed
    /// to Python).
    pinned: Spans,
    /// The first failure that is not a cancellation: every later read reports it.
    failed: Option<(Kind, String)>,
}

/// The remote side of a shard: where it lives, what of it has been fetched, and the in-memory
/// file the fetched bytes are written to (which the shard maps).
pub struct Remote {
    client: Arc<Client>,
    url: String,
    shown: PathBuf,
    size: usize,
    etag: Option<String>,
    file: File,
    /// Where the URL last redirected to, asked directly by later requests.
    location: Mutex<Option<String>>,
    state: Mutex<Ranges>,
    ready: Condvar,
    /// Bytes fetched so far (retries counted once per byte written).
    pub fetched: AtomicU64,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("shown", &self.shown)
            .field("size", &self.size)
            .finish()
    }
}

/// An anonymous file of `size` bytes that holds no memory until written.
fn scratch_file(shown: &Path, size: usize) -> Result<File> {
    #[cfg(target_os = "linux")]
    let file = {
        // SAFETY: the name is a NUL-terminated literal; memfd_create returns a new descriptor
        // (or -1), which `File` then owns alone.
        let fd = unsafe { libc::memfd_create(c"rlmask-remote".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::io(shown, std::io::Error::last_os_error()));
        }
        use std::os::fd::FromRawFd;
        // SAFETY: `fd` is a fresh descriptor owned by nothing else.
        unsafe { File::from_raw_fd(fd) }
    };
    #[cfg(not(target_os = "linux"))]
    let file = {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir();
        let path = dir.join(format!("rlmask-remote-{}-{n}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let _ = std::fs::remove_file(&path);
        f
    };
    file.set_len(size as u64).map_err(|e| Error::io(shown, e))?;
    Ok(file)
}

fn write_at(file: &File, buf: &[u8], offset: usize) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        file.write_all_at(buf, offset as u64)
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::FileExt;
        let mut done = 0;
        while done < buf.len() {
            done += file.seek_write(&buf[done..], (offset + done) as u64)?;
        }
        Ok(())
    }
}

impl Remote {
    /// Opens the file at `url`: its size and `ETag` from a first range request, whose bytes
    /// (the first 64 KiB, or all of a smaller file) are kept. Returns the remote side and the
    /// in-memory file to map.
    pub fn open(client: &Arc<Client>, url: &str) -> Result<(Remote, File)> {
        let shown = PathBuf::from(shown_url(url));
        let never = || false;
        let first = retry(&never, || {
            let mut reply = client.get(url, url, Some((0, FIRST)))?;
            match reply.status() {
                206 => {}
                200 => return Err(ignores_range()),
                416 => return Ok(None), // an empty file
                s => return Err(status_failure(s)),
            }
            let Some((0, end, total)) = reply.content_range() else {
                return Err(Fail::Fatal(
                    Kind::Remote,
                    "the server answered a range request without a valid Content-Range".into(),
                ));
            };
            let etag = reply.header("etag").map(str::to_string);
            let mut body = Vec::with_capacity(end.min(FIRST));
            reply
                .0
                .body_mut()
                .as_reader()
                .take(end as u64)
                .read_to_end(&mut body)
                .map_err(|e| Fail::Transient(e.to_string()))?;
            if body.len() != end {
                return Err(Fail::Transient("connection closed early".into()));
            }
            Ok(Some((body, total, etag)))
        })
        .map_err(|(k, why)| to_error(&shown, k, why))?;
        let (body, size, etag) = first.unwrap_or((Vec::new(), 0, None));
        if size < 8 {
            return Err(Error::header(
                &shown,
                format!("file is {size} bytes, too short for the 8-byte header length"),
            ));
        }
        let file = scratch_file(&shown, size)?;
        write_at(&file, &body, 0).map_err(|e| Error::io(&shown, e))?;
        let remote = Remote {
            client: client.clone(),
            url: url.to_string(),
            shown,
            size,
            etag,
            file: file.try_clone().map_err(|e| Error::io(Path::new(url), e))?,
            location: Mutex::new(None),
            state: Mutex::new(Ranges::default()),
            ready: Condvar::new(),
            fetched: AtomicU64::new(body.len() as u64),
        };
        remote.lock().done.insert(0, body.len());
        Ok((remote, file))
    }

    /// The `ETag` the server gave when the file was opened, if any.
    pub fn etag(&self) -> Option<&str> {
        self.etag.as_deref()
    }

    /// The URL as shown (no credentials, no query).
    pub fn shown(&self) -> &Path {
        &self.shown
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ranges> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The error every read reports once a fetch failed for good.
    pub fn check(&self) -> Result<()> {
        match &self.lock().failed {
            Some((kind, why)) => Err(to_error(&self.shown, *kind, why.clone())),
            None => Ok(()),
        }
    }

    /// Fails when the file is no longer the one opened: asks the server for its first byte
    /// and compares the size and `ETag` with those seen on opening. Every response of the pass
    /// was compared already; this catches a file replaced after the last request started (a
    /// server may go on sending the old file's bytes to requests already answering).
    pub fn revalidate(&self) -> Result<()> {
        let never = || false;
        let now = retry(&never, || {
            let reply = self.client.get(&self.url, &self.url, Some((0, 1)))?;
            match reply.status() {
                206 => Ok((
                    reply.content_range().map(|(_, _, total)| total),
                    reply.header("etag").map(str::to_string),
                )),
                200 => Err(ignores_range()),
                s => Err(status_failure(s)),
            }
        })
        .map_err(|(k, why)| to_error(&self.shown, k, why))?;
        let changed = now.0 != Some(self.size) || (self.etag.is_some() && now.1 != self.etag);
        if changed {
            return Err(to_error(
                &self.shown,
                Kind::Changed,
                "the file changed while it was being read (its size or ETag is no longer the \
                 one seen when it was opened); no figures from it are reported"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Whether `len` bytes from `offset` are fetched.
    pub fn holds(&self, offset: usize, len: usize) -> bool {
        self.lock().done.covers(offset, offset + len)
    }

    /// Makes sure `len` bytes from `offset` are in the file: fetches what no other thread is
    /// fetching, then waits for the rest. Fails with the file's first failure, or
    /// `Error::Cancelled` once `halt` says so.
    pub fn ensure(&self, offset: usize, len: usize, halt: Halt) -> Result<()> {
        self.fetch_if(offset, len, halt, &|| true)
    }

    /// [`Remote::ensure`] for a reader ahead of a pass: fetches only while `wanted` says the
    /// bytes are still to be read, asked with the bytes claimed (so a worker that takes the
    /// item afterwards waits for this fetch instead of fetching the bytes again, and one that
    /// took it before fetches them itself: never both, and never after the pass released
    /// them).
    pub fn fetch_if(
        &self,
        offset: usize,
        len: usize,
        halt: Halt,
        wanted: &dyn Fn() -> bool,
    ) -> Result<()> {
        let end = (offset + len).min(self.size);
        loop {
            let mine = {
                let mut st = self.lock();
                if let Some((kind, why)) = &st.failed {
                    return Err(to_error(&self.shown, *kind, why.clone()));
                }
                let gaps = st.done.gaps(offset, end);
                if gaps.is_empty() {
                    return Ok(());
                }
                let mine: Vec<(usize, usize)> =
                    gaps.iter().flat_map(|&(a, b)| st.busy.gaps(a, b)).collect();
                if mine.is_empty() {
                    // Someone else is fetching the rest: wait for them.
                    let (st, _) = self
                        .ready
                        .wait_timeout(st, Duration::from_millis(50))
                        .unwrap_or_else(|e| e.into_inner());
                    drop(st);
                    if halt() {
                        return Err(Error::Cancelled);
                    }
                    continue;
                }
                if !wanted() {
                    return Ok(());
                }
                for &(a, b) in &mine {
                    st.busy.insert(a, b);
                }
                mine
            };
            for (i, &(a, b)) in mine.iter().enumerate() {
                let got = self.fetch(a, b, halt);
                let mut st = self.lock();
                match &got {
                    Ok(()) => {
                        st.busy.remove(a, b);
                        st.done.insert(a, b);
                    }
                    Err((kind, why)) => {
                        for &(a, b) in &mine[i..] {
                            st.busy.remove(a, b);
                        }
                        if *kind != Kind::Cancelled && st.failed.is_none() {
                            st.failed = Some((*kind, why.clone()));
                        }
                    }
                }
                drop(st);
                self.ready.notify_all();
                if let Err((kind, why)) = got {
                    return Err(to_error(&self.shown, kind, why));
                }
            }
        }
    }

    /// Fetches `[start, end)` into the file, resuming after a dropped connection from the
    /// last byte written.
    fn fetch(
        &self,
        start: usize,
        end: usize,
        halt: Halt,
    ) -> std::result::Result<(), (Kind, String)> {
        let mut at = start;
        let mut buf = vec![0u8; PIECE.min(end - start)];
        retry(halt, || {
            // Where a redirect led last time (a hub's CDN), asked directly: one round trip
            // instead of two. A refusal there (a signed location expires) goes back to the URL.
            let cached = self
                .location
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let target = cached.as_deref().unwrap_or(&self.url);
            let mut reply = self.client.get(target, &self.url, Some((at, end)))?;
            match reply.status() {
                206 => {}
                401 | 403 | 404 | 410 if cached.is_some() => {
                    *self.location.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    return Err(Fail::Transient("the redirected location expired".into()));
                }
                200 => return Err(ignores_range()),
                s => return Err(status_failure(s)),
            }
            if cached.is_none() && reply.location() != self.url {
                *self.location.lock().unwrap_or_else(|e| e.into_inner()) = Some(reply.location());
            }
            let changed = |why: String| Fail::Fatal(Kind::Changed, why);
            match reply.content_range() {
                Some((a, b, total)) if total != self.size => {
                    let _ = (a, b);
                    return Err(changed(format!(
                        "the file changed while it was being read (size {} -> {total} bytes); \
                         no figures from it are reported",
                        self.size
                    )));
                }
                Some((a, b, _)) if (a, b) == (at, end) => {}
                _ => {
                    return Err(Fail::Fatal(
                        Kind::Remote,
                        format!(
                            "the server answered bytes {at}-{} with another range or none",
                            end - 1
                        ),
                    ))
                }
            }
            if let (Some(was), Some(now)) = (&self.etag, reply.header("etag")) {
                if was != now {
                    return Err(changed(
                        "the file changed while it was being read (its ETag changed); no \
                         figures from it are reported"
                            .into(),
                    ));
                }
            }
            let mut body = reply.0.body_mut().as_reader();
            while at < end {
                if halt() {
                    return Err(Fail::Fatal(Kind::Cancelled, String::new()));
                }
                let want = (end - at).min(buf.len());
                let n = body
                    .read(&mut buf[..want])
                    .map_err(|e| Fail::Transient(e.to_string()))?;
                if n == 0 {
                    return Err(Fail::Transient("connection closed early".into()));
                }
                write_at(&self.file, &buf[..n], at).map_err(|e| {
                    Fail::Fatal(Kind::Remote, format!("cannot keep fetched bytes: {e}"))
                })?;
                self.fetched.fetch_add(n as u64, Ordering::Relaxed);
                at += n;
            }
            Ok(())
        })
    }

    /// Drops the fetched bytes of the whole pages inside `len` bytes from `offset` (a hole
    /// punched into the in-memory file); a later read fetches them again. A hint: failures
    /// are ignored.
    pub fn release(&self, offset: usize, len: usize) {
        const PAGE: usize = 4096;
        let start = offset.div_ceil(PAGE) * PAGE;
        let end = (offset + len).min(self.size) / PAGE * PAGE;
        if end <= start {
            return;
        }
        let mut st = self.lock();
        // Neither what is pinned nor what a thread is still writing (a reader late on a
        // range whose items are done): that stays until the shard is dropped.
        let free: Vec<(usize, usize)> = st
            .pinned
            .gaps(start, end)
            .into_iter()
            .flat_map(|(a, b)| st.busy.gaps(a, b))
            .collect();
        for (a, b) in free {
            let (a, b) = (a.div_ceil(PAGE) * PAGE, b / PAGE * PAGE);
            if a < b {
                st.done.remove(a, b);
                self.punch(a, b);
            }
        }
    }

    /// Fetches `len` bytes from `offset` and keeps them for as long as the shard lives.
    pub fn pin(&self, offset: usize, len: usize) -> Result<()> {
        self.ensure(offset, len, &|| false)?;
        self.lock().pinned.insert(offset, offset + len);
        Ok(())
    }

    /// Frees the memory of the whole pages of `[start, end)`.
    fn punch(&self, start: usize, end: usize) {
        #[cfg(not(target_os = "linux"))]
        let _ = (start, end);
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: plain syscall on a descriptor this struct owns; punching a hole only
            // changes the file's contents (to zeros) in a range no thread reads any more: the
            // range was removed from `done` above, so a later read fetches it first.
            let _ = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    start as libc::off_t,
                    (end - start) as libc::off_t,
                )
            };
        }
    }
}

fn ignores_range() -> Fail {
    Fail::Fatal(
        Kind::Remote,
        "the server ignores range requests (it answered a byte range with the whole file, which \
         was not read); rlmask reads remote checkpoints only by ranges: serve them from a \
         server that honours Range"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_against_a_bitmap() {
        let mut s = Spans::default();
        let mut bits = [false; 200];
        let mut x = 12345u64;
        let mut next = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        for _ in 0..2000 {
            let a = next(200);
            let b = (a + next(30)).min(200);
            if next(3) == 0 {
                s.remove(a, b);
                bits[a..b].iter_mut().for_each(|v| *v = false);
            } else {
                s.insert(a, b);
                bits[a..b].iter_mut().for_each(|v| *v = true);
            }
            let (c, d) = {
                let c = next(200);
                (c, (c + next(40)).min(200))
            };
            assert_eq!(s.covers(c, d), bits[c..d].iter().all(|&v| v));
            let gaps: Vec<usize> = s.gaps(c, d).iter().flat_map(|&(a, b)| a..b).collect();
            let want: Vec<usize> = (c..d).filter(|&i| !bits[i]).collect();
            assert_eq!(gaps, want);
            // Disjoint and not adjacent.
            let v: Vec<(usize, usize)> = s.0.iter().map(|(&a, &b)| (a, b)).collect();
            assert!(v.windows(2).all(|w| w[0].1 < w[1].0));
            assert!(v.iter().all(|&(a, b)| a < b));
        }
    }

    #[test]
    fn shown_urls_carry_no_credentials() {
        assert_eq!(
            shown_url("https://user:secret@host:8080/a/b.safetensors?X-Amz-Signature=1#f"),
            "https://host:8080/a/b.safetensors"
        );
        assert_eq!(shown_url("http://h/x"), "http://h/x");
    }
}
