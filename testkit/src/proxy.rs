//! A fault-injecting HTTP/1.1 proxy for S3 traffic ([`FaultProxy`]): it forwards requests to
//! a server unchanged and, when told to, answers some of them with server errors, resets,
//! stalls or bodies cut short.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// What kind of S3 request a proxied request is, as far as faults and counts go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// GET with a `Range` header (a ranged GetObject).
    RangedGet,
    /// Any other GET (a whole GetObject, a listing).
    Get,
    /// HEAD (HeadObject).
    Head,
    /// PUT `?partNumber=…&uploadId=…` (UploadPart).
    UploadPart,
    /// Any other PUT (PutObject, CreateBucket, CopyObject).
    Put,
    /// POST `?uploads` (CreateMultipartUpload).
    CreateUpload,
    /// POST `?uploadId=…` (CompleteMultipartUpload).
    CompleteUpload,
    /// DELETE `?uploadId=…` (AbortMultipartUpload).
    AbortUpload,
    /// Anything else (DeleteObject, other POSTs).
    Other,
}

/// One way to mistreat a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer `500 InternalError` (S3 XML) without forwarding.
    InternalError,
    /// Answer `503 SlowDown` (S3 XML) without forwarding.
    SlowDown,
    /// Close the connection without reading the request or answering; nothing is forwarded.
    Reset,
    /// Forward, send the response headers, then close before the first body byte.
    ResetAfterHeaders,
    /// Read the request, say nothing for this long, then close; nothing is forwarded.
    Stall(Duration),
    /// Forward, send the headers and the first half of the body, say nothing for this long,
    /// then close.
    StallBody(Duration),
    /// Forward, send the headers (with the full `Content-Length`) and the first half of the
    /// body, then close.
    Truncate,
    /// Forward a ranged GET and answer with a consistent `206` (`Content-Range`,
    /// `Content-Length`) covering only the first half of the range asked for. Other
    /// answers pass unchanged.
    ShortRange,
}

/// Applies `fault` to requests of `kind`, after letting `skip` of them pass: the next
/// `remaining` of them, or with `remaining: None` every `period`-th one for as long as the
/// rule stays.
#[derive(Debug)]
struct Rule {
    kind: RequestKind,
    fault: Fault,
    skip: u64,
    remaining: Option<u64>,
    period: u64,
    matched: u64,
}

#[derive(Debug, Default)]
struct State {
    rules: Vec<Rule>,
    seen: HashMap<RequestKind, u64>,
    injected: HashMap<RequestKind, u64>,
}

impl State {
    /// Counts a request of `kind` and picks the fault to apply to it, if any.
    fn on_request(&mut self, kind: RequestKind) -> Option<Fault> {
        *self.seen.entry(kind).or_default() += 1;
        let mut chosen = None;
        for rule in self.rules.iter_mut().filter(|r| r.kind == kind) {
            if rule.skip > 0 {
                rule.skip -= 1;
                continue;
            }
            let applies = match &mut rule.remaining {
                Some(0) => false,
                Some(n) => {
                    *n -= 1;
                    true
                }
                None => {
                    rule.matched += 1;
                    rule.matched % rule.period == 0
                }
            };
            if applies {
                chosen = Some(rule.fault);
                break;
            }
        }
        self.rules.retain(|r| r.remaining != Some(0));
        if chosen.is_some() {
            *self.injected.entry(kind).or_default() += 1;
        }
        chosen
    }
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An HTTP/1.1 proxy on 127.0.0.1 in front of an S3 server, with a programmable plan of
/// faults. Requests are forwarded with their headers unchanged (the `Host` header included,
/// so SigV4 signatures made for the proxy's address still verify at the server), one
/// backend connection per request. It counts the requests it sees by [`RequestKind`], so
/// tests can tell how often a client retried.
///
/// It runs on its own thread and runtime, independent of the test's, and stops when
/// dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    state: Shared,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port forwarding to `target`.
    ///
    /// # Panics
    /// When no port or thread is available.
    pub fn start(target: SocketAddr) -> FaultProxy {
        // Bound here, so the port is known (and taken) before this returns; the proxy's own
        // runtime adopts it on its thread (this may be called from inside another runtime,
        // which cannot block on a second one).
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .unwrap_or_else(|e| panic!("cannot bind a loopback port for the proxy: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("cannot read the proxy's address: {e}"));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot build the proxy's runtime: {e}"));
        let state = Shared::default();
        let (stop, stopped) = oneshot::channel();
        let serving = state.clone();
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => serve(listener, target, serving, stopped).await,
                        Err(e) => panic!("cannot listen on the proxy's port: {e}"),
                    }
                })
            })
            .unwrap_or_else(|e| panic!("cannot start the proxy thread: {e}"));
        FaultProxy {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT` of the proxy.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Applies `fault` to the next `times` requests of `kind`. Rules apply in the order
    /// they were added; a request gets at most one fault.
    pub fn fail_next(&self, kind: RequestKind, times: u64, fault: Fault) {
        self.add(Rule {
            kind,
            fault,
            skip: 0,
            remaining: Some(times),
            period: 1,
            matched: 0,
        });
    }

    /// Applies `fault` to every `period`-th request of `kind` (every one for `period` 1)
    /// until [`FaultProxy::clear_faults`].
    pub fn fail_every(&self, kind: RequestKind, period: u64, fault: Fault) {
        self.fail_after(kind, 0, period, fault);
    }

    /// Lets the next `skip` requests of `kind` pass, then applies `fault` to every
    /// `period`-th one until [`FaultProxy::clear_faults`].
    pub fn fail_after(&self, kind: RequestKind, skip: u64, period: u64, fault: Fault) {
        self.add(Rule {
            kind,
            fault,
            skip,
            remaining: None,
            period: period.max(1),
            matched: 0,
        });
    }

    fn add(&self, rule: Rule) {
        lock(&self.state).rules.push(rule);
    }

    /// Drops every pending fault; requests pass unchanged from now on.
    pub fn clear_faults(&self) {
        lock(&self.state).rules.clear();
    }

    /// Requests of `kind` seen so far, faulted or not.
    pub fn requests(&self, kind: RequestKind) -> u64 {
        lock(&self.state).seen.get(&kind).copied().unwrap_or(0)
    }

    /// Requests of `kind` a fault was applied to so far.
    pub fn injected(&self, kind: RequestKind) -> u64 {
        lock(&self.state).injected.get(&kind).copied().unwrap_or(0)
    }

    /// Forgets the counts of [`FaultProxy::requests`] and [`FaultProxy::injected`].
    pub fn reset_counts(&self) {
        let mut state = lock(&self.state);
        state.seen.clear();
        state.injected.clear();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts connections until `stopped`; dropping the runtime afterwards ends the
/// connections still open.
async fn serve(
    listener: TcpListener,
    target: SocketAddr,
    state: Shared,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(req, target, state.clone()));
            // A connection ends in an error whenever a fault cuts it: nothing to report.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type ProxyBody = BoxBody<Bytes, io::Error>;

/// Answers one request: forwards it, or applies the fault the plan picks for it. An `Err`
/// makes the server side close the connection without answering.
async fn handle(
    req: Request<Incoming>,
    target: SocketAddr,
    state: Shared,
) -> io::Result<Response<ProxyBody>> {
    let kind = classify(&req);
    let fault = lock(&state).on_request(kind);
    let Some(fault) = fault else {
        return Ok(forward(req, target).await?.map(boxed_incoming));
    };
    match fault {
        Fault::InternalError => {
            drain(req).await;
            Ok(s3_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "We encountered an internal error. Please try again.",
            ))
        }
        Fault::SlowDown => {
            drain(req).await;
            Ok(s3_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "SlowDown",
                "Please reduce your request rate.",
            ))
        }
        Fault::Reset => Err(injected("connection reset")),
        Fault::Stall(pause) => {
            drain(req).await;
            tokio::time::sleep(pause).await;
            Err(injected("stalled, then closed"))
        }
        Fault::ResetAfterHeaders => {
            let (head, body) = collect(forward(req, target).await?).await?;
            Ok(cut_body(head, body, 0, None))
        }
        Fault::Truncate => {
            let (head, body) = collect(forward(req, target).await?).await?;
            let keep = body.len() / 2;
            Ok(cut_body(head, body, keep, None))
        }
        Fault::StallBody(pause) => {
            let (head, body) = collect(forward(req, target).await?).await?;
            let keep = body.len() / 2;
            Ok(cut_body(head, body, keep, Some(pause)))
        }
        Fault::ShortRange => {
            let response = forward(req, target).await?;
            if response.status() != StatusCode::PARTIAL_CONTENT {
                return Ok(response.map(boxed_incoming));
            }
            let (head, body) = collect(response).await?;
            Ok(short_range(head, body))
        }
    }
}

fn classify(req: &Request<Incoming>) -> RequestKind {
    let query = req.uri().query().unwrap_or("");
    let has = |name: &str| {
        query
            .split('&')
            .any(|pair| pair.split('=').next() == Some(name))
    };
    match *req.method() {
        Method::GET if req.headers().contains_key(RANGE) => RequestKind::RangedGet,
        Method::GET => RequestKind::Get,
        Method::HEAD => RequestKind::Head,
        Method::PUT if has("partNumber") => RequestKind::UploadPart,
        Method::PUT => RequestKind::Put,
        Method::POST if has("uploads") => RequestKind::CreateUpload,
        Method::POST if has("uploadId") => RequestKind::CompleteUpload,
        Method::DELETE if has("uploadId") => RequestKind::AbortUpload,
        _ => RequestKind::Other,
    }
}

fn injected(what: &str) -> io::Error {
    io::Error::other(format!("injected fault: {what}"))
}

/// Sends `req` to `target` on a new connection.
async fn forward(req: Request<Incoming>, target: SocketAddr) -> io::Result<Response<Incoming>> {
    let stream = TcpStream::connect(target).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(connection);
    sender.send_request(req).await.map_err(io::Error::other)
}

/// Reads the whole request body, so an answer sent without forwarding does not race the
/// client still sending.
async fn drain(req: Request<Incoming>) {
    let _ = req.into_body().collect().await;
}

async fn collect(
    response: Response<Incoming>,
) -> io::Result<(hyper::http::response::Parts, Bytes)> {
    let (head, body) = response.into_parts();
    let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
    Ok((head, body))
}

fn boxed_incoming(body: Incoming) -> ProxyBody {
    body.map_err(io::Error::other).boxed()
}

fn full(data: Bytes) -> ProxyBody {
    Full::new(data).map_err(|never| match never {}).boxed()
}

fn s3_error(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>"
    );
    let mut response = Response::new(full(Bytes::from(xml)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/xml"));
    response
}

/// The response `head` with its original `Content-Length` but only the first `keep` bytes
/// of `body`, after which the connection breaks (after `pause`, when given).
fn cut_body(
    head: hyper::http::response::Parts,
    body: Bytes,
    keep: usize,
    pause: Option<Duration>,
) -> Response<ProxyBody> {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        if keep > 0 && tx.send(Ok(body.slice(..keep))).await.is_err() {
            return;
        }
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
        let _ = tx.send(Err(injected("body cut short"))).await;
    });
    Response::from_parts(head, ChannelBody { rx }.boxed())
}

/// A 206 answer narrowed to the first half of its range, consistently: `Content-Range`,
/// `Content-Length` and the body all describe the shorter range.
fn short_range(mut head: hyper::http::response::Parts, body: Bytes) -> Response<ProxyBody> {
    let parsed = head
        .headers
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes "))
        .and_then(|v| {
            let (range, total) = v.split_once('/')?;
            let first: u64 = range.split_once('-')?.0.parse().ok()?;
            Some((first, total.to_string()))
        });
    let keep = body.len() / 2;
    let Some((first, total)) = parsed.filter(|_| keep > 0) else {
        return Response::from_parts(head, full(body));
    };
    let last = first + keep as u64 - 1;
    if let Ok(value) = HeaderValue::from_str(&format!("bytes {first}-{last}/{total}")) {
        head.headers.insert(CONTENT_RANGE, value);
    }
    head.headers.insert(CONTENT_LENGTH, HeaderValue::from(keep));
    Response::from_parts(head, full(body.slice(..keep)))
}

/// A response body fed through a channel, so a fault can pause it or break it off.
#[derive(Debug)]
struct ChannelBody {
    rx: mpsc::Receiver<io::Result<Bytes>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|next| next.map(|chunk| chunk.map(Frame::data)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        kind: RequestKind,
        fault: Fault,
        skip: u64,
        remaining: Option<u64>,
        period: u64,
    ) -> Rule {
        Rule {
            kind,
            fault,
            skip,
            remaining,
            period,
            matched: 0,
        }
    }

    #[test]
    fn rules_apply_in_order_and_count() {
        let mut state = State::default();
        state
            .rules
            .push(rule(RequestKind::RangedGet, Fault::SlowDown, 0, Some(2), 1));
        state
            .rules
            .push(rule(RequestKind::RangedGet, Fault::Truncate, 0, None, 3));
        state
            .rules
            .push(rule(RequestKind::UploadPart, Fault::Reset, 1, None, 1));
        let gets: Vec<_> = (0..8)
            .map(|_| state.on_request(RequestKind::RangedGet))
            .collect();
        // The first rule takes two requests, then every third of the rest is cut.
        assert_eq!(
            gets,
            [
                Some(Fault::SlowDown),
                Some(Fault::SlowDown),
                None,
                None,
                Some(Fault::Truncate),
                None,
                None,
                Some(Fault::Truncate),
            ]
        );
        let parts: Vec<_> = (0..3)
            .map(|_| state.on_request(RequestKind::UploadPart))
            .collect();
        assert_eq!(parts, [None, Some(Fault::Reset), Some(Fault::Reset)]);
        assert_eq!(state.on_request(RequestKind::Head), None);
        assert_eq!(state.seen[&RequestKind::RangedGet], 8);
        assert_eq!(state.injected[&RequestKind::RangedGet], 4);
        assert_eq!(state.injected[&RequestKind::UploadPart], 2);
        assert!(!state.injected.contains_key(&RequestKind::Head));
        // The exhausted rule is gone; the others stay.
        assert_eq!(state.rules.len(), 2);
    }
}
