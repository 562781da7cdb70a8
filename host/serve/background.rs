//! Background responses (the Responses API's `background: true`): the request returns at once,
//! its generation runs on in a task whatever becomes of the connection, and the client polls
//! `GET /v1/responses/{id}`, cancels it (`POST /v1/responses/{id}/cancel`), or, for one created
//! with `stream`, reads its events again from any point
//! (`GET /v1/responses/{id}?stream=true&starting_after=N`).
//!
//! A [`Run`] holds a background response's object as it goes (`queued`, `in_progress`, then
//! the finished response, `failed` or `cancelled`) and a streamed one's events; [`Runs`]
//! keeps those running and the last ended ones (in memory, as the stored responses).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use serde_json::Value;

/// Ended runs kept for polling and reading their streams again (a finished response stays in
/// the responses store too, for `GET` and `previous_response_id`).
pub const KEPT_RUNS: usize = 64;

/// A background response.
#[derive(Debug)]
pub struct Run {
    pub id: String,
    /// Created with `stream`: its events are kept for readers.
    pub stream: bool,
    /// The items it is generated from (`GET /v1/responses/{id}/input_items`).
    pub input_items: Vec<Value>,
    state: Mutex<State>,
    /// Ticks on every change: readers wait on it.
    changed: tokio::sync::watch::Sender<()>,
}

#[derive(Debug)]
struct State {
    response: Value,
    /// The response object a cancel leaves.
    cancelled: Value,
    events: Vec<Value>,
    ended: bool,
    task: Option<tokio::task::AbortHandle>,
}

impl Run {
    /// A run whose object is `queued` until it starts; `cancelled` is its object should it be
    /// cancelled.
    pub fn new(
        id: String,
        stream: bool,
        queued: Value,
        cancelled: Value,
        input_items: Vec<Value>,
    ) -> Run {
        Run {
            id,
            stream,
            input_items,
            state: Mutex::new(State {
                response: queued,
                cancelled,
                events: Vec::new(),
                ended: false,
                task: None,
            }),
            changed: tokio::sync::watch::channel(()).0,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The response object now.
    pub fn response(&self) -> Value {
        self.state().response.clone()
    }

    pub fn ended(&self) -> bool {
        self.state().ended
    }

    /// The task that runs it (a cancel that came first aborts it at once).
    pub fn set_task(&self, task: tokio::task::AbortHandle) {
        let mut s = self.state();
        if s.ended {
            task.abort();
        }
        s.task = Some(task);
    }

    /// The stream's events so far; the object follows the last one that carries it
    /// (`response.in_progress`, ...). Nothing once the run has ended (a cancel).
    pub fn push(&self, events: Vec<Value>) {
        let mut s = self.state();
        if s.ended {
            return;
        }
        if let Some(r) = events.iter().rev().find_map(|e| e.get("response")) {
            s.response = r.clone();
        }
        if self.stream {
            s.events.extend(events);
        }
        drop(s);
        self.changed.send_replace(());
    }

    /// The run has its final object (`completed`, `incomplete`, `failed`); false when it had
    /// ended already (cancelled).
    pub fn finish(&self, response: Value) -> bool {
        let mut s = self.state();
        if s.ended {
            return false;
        }
        s.response = response;
        s.ended = true;
        s.task = None;
        drop(s);
        self.changed.send_replace(());
        true
    }

    /// Stops a run still going (its generation ends with its task): its object becomes
    /// `cancelled`. One that has ended stays as it ended (a cancel is idempotent).
    pub fn cancel(&self) {
        let mut s = self.state();
        if s.ended {
            return;
        }
        s.ended = true;
        s.response = s.cancelled.clone();
        if let Some(t) = s.task.take() {
            t.abort();
        }
        drop(s);
        self.changed.send_replace(());
    }

    /// The events after sequence number `after` (all of them: `None`), then those that come,
    /// until the run ends.
    pub fn follow(self: Arc<Self>, after: Option<u64>) -> impl Stream<Item = Vec<Value>> + use<> {
        let next = after.map_or(0, |n| n.saturating_add(1) as usize);
        let rx = self.changed.subscribe();
        futures_util::stream::unfold((self, next, rx), |(run, next, mut rx)| async move {
            loop {
                // Marked seen before reading: a change after this read wakes the wait below.
                rx.borrow_and_update();
                let (events, ended) = {
                    let s = run.state();
                    let from = next.min(s.events.len());
                    (s.events[from..].to_vec(), s.ended)
                };
                if !events.is_empty() {
                    let next = next + events.len();
                    return Some((events, (run, next, rx)));
                }
                if ended || rx.changed().await.is_err() {
                    return None;
                }
            }
        })
    }
}

/// The background runs of a server: those running and the last [`KEPT_RUNS`] ended.
#[derive(Debug, Default)]
pub struct Runs {
    by_id: HashMap<String, Arc<Run>>,
    ended: VecDeque<String>,
}

impl Runs {
    pub fn add(&mut self, run: Arc<Run>) {
        self.by_id.insert(run.id.clone(), run);
    }

    pub fn get(&self, id: &str) -> Option<Arc<Run>> {
        self.by_id.get(id).cloned()
    }

    /// A run has ended: kept among the last ended, the oldest beyond them forgotten.
    pub fn ended(&mut self, id: &str) {
        if !self.by_id.contains_key(id) || self.ended.iter().any(|x| x == id) {
            return;
        }
        self.ended.push_back(id.to_string());
        while self.ended.len() > KEPT_RUNS {
            if let Some(old) = self.ended.pop_front() {
                self.by_id.remove(&old);
            }
        }
    }

    pub fn remove(&mut self, id: &str) -> Option<Arc<Run>> {
        self.ended.retain(|x| x != id);
        self.by_id.remove(id)
    }
}

/// `starting_after` and `stream` of `GET /v1/responses/{id}`'s query (others, such as
/// `include`, are read and change nothing here).
pub fn parse_query(query: Option<&str>) -> Result<(bool, Option<u64>), super::error::ApiError> {
    let (mut stream, mut after) = (false, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "stream" => {
                stream = match v {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(super::error::ApiError::invalid(
                            "stream",
                            format!("stream must be true or false, got {v:?}"),
                        ));
                    }
                }
            }
            "starting_after" => {
                after = Some(v.parse().map_err(|_| {
                    super::error::ApiError::invalid(
                        "starting_after",
                        format!("starting_after must be an event's sequence_number, got {v:?}"),
                    )
                })?)
            }
            _ => {}
        }
    }
    Ok((stream, after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use serde_json::json;

    fn event(seq: u64, kind: &str) -> Value {
        json!({"type": kind, "sequence_number": seq})
    }

    fn run(stream: bool) -> Arc<Run> {
        let queued = json!({"id": "r", "status": "queued"});
        let cancelled = json!({"id": "r", "status": "cancelled"});
        Arc::new(Run::new("r".into(), stream, queued, cancelled, Vec::new()))
    }

    #[tokio::test]
    async fn readers_get_every_event_from_where_they_start() {
        let r = run(true);
        let all = r.clone().follow(None);
        let late = r.clone().follow(Some(1));
        r.push(vec![
            json!({"type": "response.created", "sequence_number": 0,
                   "response": {"status": "in_progress"}}),
            event(1, "a"),
        ]);
        assert_eq!(r.response()["status"], "in_progress");
        r.push(vec![event(2, "b")]);
        let feeder = {
            let r = r.clone();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                r.push(vec![event(3, "c")]);
                assert!(r.finish(json!({"status": "completed"})));
            })
        };
        let seqs = |v: Vec<Vec<Value>>| -> Vec<u64> {
            v.concat()
                .iter()
                .map(|e| e["sequence_number"].as_u64().unwrap())
                .collect()
        };
        assert_eq!(seqs(all.collect().await), [0, 1, 2, 3]);
        assert_eq!(seqs(late.collect().await), [2, 3]);
        feeder.await.unwrap();
        // After the end: what was kept, and no wait.
        assert_eq!(seqs(r.clone().follow(Some(2)).collect().await), [3]);
        assert_eq!(r.response()["status"], "completed");
        // Ended: a cancel changes nothing.
        r.cancel();
        assert_eq!(r.response()["status"], "completed");
    }

    #[tokio::test]
    async fn a_cancel_ends_the_run_and_its_task() {
        let r = run(false);
        let task = tokio::spawn(std::future::pending::<()>());
        r.set_task(task.abort_handle());
        r.push(vec![event(0, "a")]);
        r.cancel();
        assert!(task.await.unwrap_err().is_cancelled());
        assert_eq!(r.response()["status"], "cancelled");
        assert!(r.ended());
        // What the task does after it is not taken.
        assert!(!r.finish(json!({"status": "completed"})));
        r.push(vec![json!({"response": {"status": "in_progress"}})]);
        assert_eq!(r.response()["status"], "cancelled");
        // A run not streamed keeps no events.
        assert!(r.clone().follow(None).collect::<Vec<_>>().await.is_empty());
        // A cancel before the task is known aborts it when it is.
        let early = run(false);
        early.cancel();
        let task = tokio::spawn(std::future::pending::<()>());
        early.set_task(task.abort_handle());
        assert!(task.await.unwrap_err().is_cancelled());
    }

    #[test]
    fn the_last_ended_runs_are_kept() {
        let mut runs = Runs::default();
        for i in 0..KEPT_RUNS + 3 {
            let r = Arc::new(Run::new(
                format!("r{i}"),
                false,
                json!({}),
                json!({}),
                Vec::new(),
            ));
            runs.add(r);
        }
        runs.ended("r0");
        runs.ended("r0");
        for i in 2..KEPT_RUNS + 2 {
            runs.ended(&format!("r{i}"));
        }
        // r0 went first; r1 runs on, whatever ended after it.
        assert!(runs.get("r0").is_none());
        assert!(runs.get("r1").is_some() && runs.get("r2").is_some());
        runs.ended("r1");
        assert!(runs.get("r2").is_none());
        assert!(runs.remove("r1").is_some() && runs.get("r1").is_none());
    }

    #[test]
    fn queries_read_stream_and_starting_after() {
        assert_eq!(parse_query(None).unwrap(), (false, None));
        assert_eq!(
            parse_query(Some("stream=true&starting_after=7&include=x")).unwrap(),
            (true, Some(7))
        );
        let e = parse_query(Some("starting_after=-1")).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("starting_after"));
        let e = parse_query(Some("stream=yes")).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stream"));
    }
}
