//! OpenAI's Conversations API (`/v1/conversations`): a conversation is a list of items (the
//! Responses API's messages, function calls, their outputs and reasoning) that a response
//! naming it with `conversation` reads as its context, and that its input and output join
//! when it ends. One response at a time per conversation ([`Lease`]), so that two never read
//! the same history and interleave their turns.
//!
//! Kept in memory, bounded in number and bytes (the least recently used go first), and with
//! `--conversation-dir` on disk too: one JSON file per conversation, written whole (atomically)
//! on every change before the change is answered, so a restart loses nothing; memory is then
//! a cache of the files, and a conversation it let go is read again when next used.
//! Engine-free: `http.rs` routes the requests and runs the responses.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hyper::StatusCode;
use serde_json::{Map, Value, json};

use super::api::{metadata, type_name};
use super::batch::{self, ListQuery};
use super::error::ApiError;
use super::responses;

/// Conversations kept...
pub const CAPACITY: usize = 1024;

/// ...and at most this many bytes of their items (as JSON) in all.
pub const BYTES: usize = 64 << 20;

/// Items one request may add (OpenAI's limit).
pub const ITEMS_PER_CALL: usize = 20;

/// A conversation as its file holds it.
#[derive(serde::Serialize)]
struct Record<'a> {
    id: &'a str,
    created_at: u64,
    metadata: &'a Map<String, Value>,
    items: Vec<&'a Value>,
}

#[derive(serde::Deserialize)]
struct Loaded {
    created_at: u64,
    metadata: Map<String, Value>,
    items: Vec<Value>,
}

/// Writes conversation `id`'s file (with `items`), if the store has a directory.
fn save(
    dir: Option<&Path>,
    id: &str,
    created_at: u64,
    metadata: &Map<String, Value>,
    items: Vec<&Value>,
) -> Result<(), ApiError> {
    let Some(dir) = dir else {
        return Ok(());
    };
    let record = Record {
        id,
        created_at,
        metadata,
        items,
    };
    let bytes = serde_json::to_vec(&record).map_err(|e| ApiError::internal(e.to_string()))?;
    crate::files::write_atomic(&file(dir, id), &bytes).map_err(|e| {
        tracing::error!("conversation {id}: {e:#}");
        ApiError::internal(format!(
            "cannot write conversation {id} to --conversation-dir: nothing was changed"
        ))
    })
}

fn file(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// Ids this server makes (`conv_` and hex) name files; others are never looked for on disk.
fn names_a_file(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The error for a conversation that is not kept.
pub fn missing(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "no conversation `{id}` (conversations are kept in memory, the {CAPACITY} last used up to {} MiB)",
        BYTES >> 20
    ))
}

struct Conversation {
    created_at: u64,
    metadata: Map<String, Value>,
    items: Vec<Value>,
    bytes: usize,
    /// A response on it is running.
    busy: bool,
}

#[derive(Default)]
pub struct Store {
    by_id: HashMap<String, Conversation>,
    /// Least recently used first.
    order: VecDeque<String>,
    bytes: usize,
    /// `--conversation-dir`: where each conversation's file is.
    dir: Option<PathBuf>,
}

fn object(id: &str, c: &Conversation) -> Value {
    json!({"id": id, "object": "conversation", "created_at": c.created_at, "metadata": c.metadata})
}

fn size(items: &[Value]) -> usize {
    items.iter().map(|i| i.to_string().len()).sum()
}

fn list(items: &[Value]) -> Value {
    json!({
        "object": "list",
        "data": items,
        "first_id": items.first().map(|i| &i["id"]),
        "last_id": items.last().map(|i| &i["id"]),
        "has_more": false,
    })
}

/// The body's keys are among `known`; errors name the first that is not.
fn only(body: &Map<String, Value>, known: &[&str]) -> Result<(), ApiError> {
    match body.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(ApiError::invalid(
            k,
            format!("unknown field `{k}` (known: {})", known.join(", ")),
        )
        .with_code("unknown_parameter")),
        None => Ok(()),
    }
}

/// `items` of a request: at most [`ITEMS_PER_CALL`], read as a response's input is; their
/// missing ids are made from `tag` (distinct ids are checked against what they join).
fn new_items(v: Option<&Value>, tag: &str, required: bool) -> Result<Vec<Value>, ApiError> {
    let v = match v {
        None | Some(Value::Null) if !required => return Ok(Vec::new()),
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("items", "`items` is required"));
        }
        Some(v) => v,
    };
    let Value::Array(a) = v else {
        return Err(ApiError::invalid(
            "items",
            format!("items must be an array of items, got {}", type_name(v)),
        ));
    };
    if a.len() > ITEMS_PER_CALL || (required && a.is_empty()) {
        return Err(ApiError::invalid(
            "items",
            format!(
                "items holds {} items: add 1 to {ITEMS_PER_CALL} at a time",
                a.len()
            ),
        ));
    }
    responses::items("items", v, tag)
}

/// A list route's query: `limit` (1-100, 20), `order` (`desc` by default), `after`, and
/// `include` (what this server makes is always there, so it changes nothing).
pub fn parse_query(
    query: Option<&str>,
    decode: impl Fn(&str) -> String,
) -> Result<ListQuery, ApiError> {
    let rules = batch::ListRules {
        limit: 20,
        order: Some(false),
    };
    batch::parse_list(
        query,
        rules,
        |k, _| matches!(k, "include" | "include[]"),
        decode,
    )
}

/// A page of items (ids are their `id`s).
pub fn page(items: &[Value], q: &ListQuery) -> Result<Value, ApiError> {
    let keyed = items
        .iter()
        .map(|i| (i["id"].as_str().unwrap_or_default().to_string(), i.clone()))
        .collect();
    batch::page(keyed, q)
}

impl Store {
    /// A store whose conversations are files in `dir` too (made if missing).
    pub fn on_disk(dir: &Path) -> anyhow::Result<Store> {
        std::fs::create_dir_all(dir)?;
        Ok(Store {
            dir: Some(dir.to_path_buf()),
            ..Store::default()
        })
    }

    /// Reads conversation `id` from its file into memory (`Ok(false)`: there is none).
    fn load(&mut self, id: &str) -> Result<bool, ApiError> {
        let Some(dir) = self.dir.as_deref().filter(|_| names_a_file(id)) else {
            return Ok(false);
        };
        let bytes = match std::fs::read(file(dir, id)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                tracing::error!("conversation {id}: {e}");
                return Err(ApiError::internal(format!(
                    "cannot read conversation {id} from --conversation-dir"
                )));
            }
        };
        let l: Loaded = serde_json::from_slice(&bytes).map_err(|e| {
            tracing::error!("conversation {id}: its file is not a conversation: {e}");
            ApiError::internal(format!(
                "conversation {id}'s file in --conversation-dir is damaged"
            ))
        })?;
        let bytes = size(&l.items);
        self.by_id.insert(
            id.to_string(),
            Conversation {
                created_at: l.created_at,
                metadata: l.metadata,
                items: l.items,
                bytes,
                busy: false,
            },
        );
        self.order.push_back(id.to_string());
        self.bytes += bytes;
        self.evict(id);
        Ok(true)
    }

    fn get_mut(&mut self, id: &str) -> Result<&mut Conversation, ApiError> {
        if !self.by_id.contains_key(id) && !self.load(id)? {
            return Err(missing(id));
        }
        // Used: the last to go.
        if let Some(at) = self.order.iter().position(|x| x == id) {
            let id = self.order.remove(at).expect("found");
            self.order.push_back(id);
        }
        Ok(self.by_id.get_mut(id).expect("checked"))
    }

    /// Makes room within the bounds, the least recently used first (`keep`, and those a
    /// response is running on, stay). On disk, they are only let go from memory.
    fn evict(&mut self, keep: &str) {
        while self.order.len() > CAPACITY || self.bytes > BYTES {
            let by_id = &self.by_id;
            let Some(at) = (self.order.iter())
                .position(|x| x != keep && !by_id.get(x).is_some_and(|c| c.busy))
            else {
                break;
            };
            let old = self.order.remove(at).expect("found");
            if let Some(c) = self.by_id.remove(&old) {
                self.bytes -= c.bytes;
                if self.dir.is_none() {
                    tracing::info!("conversation {old} forgotten to keep the store in bounds");
                }
            }
        }
    }

    /// `POST /v1/conversations` (`{"items", "metadata"}`): conversation `id`.
    pub fn create(
        &mut self,
        id: String,
        now: u64,
        body: &Map<String, Value>,
    ) -> Result<Value, ApiError> {
        only(body, &["items", "metadata"])?;
        let metadata = metadata(body.get("metadata").unwrap_or(&Value::Null))?.unwrap_or_default();
        let tag = format!("{}_", id.trim_start_matches("conv_"));
        let items = new_items(body.get("items"), &tag, false)?;
        responses::distinct_ids("items", &[], &items)?;
        let bytes = size(&items);
        save(
            self.dir.as_deref(),
            &id,
            now,
            &metadata,
            items.iter().collect(),
        )?;
        let c = Conversation {
            created_at: now,
            metadata,
            items,
            bytes,
            busy: false,
        };
        let out = object(&id, &c);
        self.bytes += bytes;
        self.by_id.insert(id.clone(), c);
        self.order.push_back(id.clone());
        self.evict(&id);
        Ok(out)
    }

    /// A conversation's items (`None`: no such conversation), read without taking it.
    pub fn items_of(&mut self, id: &str) -> Option<Vec<Value>> {
        self.get_mut(id).ok().map(|c| c.items.clone())
    }

    pub fn get(&mut self, id: &str) -> Result<Value, ApiError> {
        let c = self.get_mut(id)?;
        Ok(object(id, c))
    }

    /// `POST /v1/conversations/{id}` (`{"metadata"}`): the metadata replaced.
    pub fn update(&mut self, id: &str, body: &Map<String, Value>) -> Result<Value, ApiError> {
        only(body, &["metadata"])?;
        let m = body
            .get("metadata")
            .ok_or_else(|| ApiError::invalid("metadata", "`metadata` is required"))?;
        let m = metadata(m)?.unwrap_or_default();
        let dir = self.dir.clone();
        let c = self.get_mut(id)?;
        save(
            dir.as_deref(),
            id,
            c.created_at,
            &m,
            c.items.iter().collect(),
        )?;
        c.metadata = m;
        Ok(object(id, c))
    }

    pub fn delete(&mut self, id: &str) -> Result<Value, ApiError> {
        self.get_mut(id)?;
        if let Some(dir) = &self.dir
            && let Err(e) = std::fs::remove_file(file(dir, id))
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::error!("conversation {id}: {e}");
            return Err(ApiError::internal(format!(
                "cannot delete conversation {id}'s file in --conversation-dir"
            )));
        }
        let c = self.by_id.remove(id).ok_or_else(|| missing(id))?;
        self.bytes -= c.bytes;
        self.order.retain(|x| x != id);
        Ok(json!({"id": id, "object": "conversation.deleted", "deleted": true}))
    }

    pub fn items(&mut self, id: &str, q: &ListQuery) -> Result<Value, ApiError> {
        page(&self.get_mut(id)?.items, q)
    }

    /// `POST /v1/conversations/{id}/items` (`{"items"}`): the items added, as a list.
    pub fn add(
        &mut self,
        id: &str,
        tag: &str,
        body: &Map<String, Value>,
    ) -> Result<Value, ApiError> {
        // A missing conversation first: then what is wrong with the items.
        self.get_mut(id)?;
        only(body, &["items"])?;
        let items = new_items(body.get("items"), tag, true)?;
        let dir = self.dir.clone();
        let c = self.get_mut(id)?;
        responses::distinct_ids("items", &c.items, &items)?;
        let all = c.items.iter().chain(&items).collect();
        save(dir.as_deref(), id, c.created_at, &c.metadata, all)?;
        let out = list(&items);
        let bytes = size(&items);
        c.items.extend(items);
        c.bytes += bytes;
        self.bytes += bytes;
        self.evict(id);
        Ok(out)
    }

    pub fn item(&mut self, id: &str, item: &str) -> Result<Value, ApiError> {
        let c = self.get_mut(id)?;
        c.items
            .iter()
            .find(|i| i["id"] == item)
            .cloned()
            .ok_or_else(|| missing_item(id, item))
    }

    /// `DELETE /v1/conversations/{id}/items/{item}`: the conversation.
    pub fn delete_item(&mut self, id: &str, item: &str) -> Result<Value, ApiError> {
        let dir = self.dir.clone();
        let c = self.get_mut(id)?;
        let at =
            (c.items.iter().position(|i| i["id"] == item)).ok_or_else(|| missing_item(id, item))?;
        let rest = (c.items.iter().enumerate())
            .filter(|(i, _)| *i != at)
            .map(|(_, x)| x)
            .collect();
        save(dir.as_deref(), id, c.created_at, &c.metadata, rest)?;
        let gone = c.items.remove(at).to_string().len();
        c.bytes -= gone;
        let out = object(id, c);
        self.bytes -= gone;
        Ok(out)
    }
}

fn missing_item(id: &str, item: &str) -> ApiError {
    ApiError::not_found(format!("conversation {id} has no item `{item}`"))
}

/// A response's hold on its conversation: while it lives no other response may run on it;
/// [`Lease::commit`] adds the response's items. Dropped uncommitted (the response failed, was
/// cancelled, or its client left), the conversation is as it was.
pub struct Lease {
    store: Arc<Mutex<Store>>,
    id: String,
}

fn lock(m: &Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Lease {
    /// Takes conversation `id` for a response: its items, or `None` if there is no such
    /// conversation; a conversation a response is running on is a 409.
    pub fn take(
        store: &Arc<Mutex<Store>>,
        id: &str,
    ) -> Result<Option<(Lease, Vec<Value>)>, ApiError> {
        let mut s = lock(store);
        let c = match s.get_mut(id) {
            Ok(c) => c,
            Err(e) if e.status == StatusCode::NOT_FOUND => return Ok(None),
            Err(e) => return Err(e),
        };
        if c.busy {
            return Err(ApiError::invalid(
                "conversation",
                format!(
                    "another response is running on conversation {id}: retry when it has ended"
                ),
            )
            .with_status(StatusCode::CONFLICT)
            .with_code("conversation_locked"));
        }
        c.busy = true;
        let lease = Lease {
            store: store.clone(),
            id: id.to_string(),
        };
        Ok(Some((lease, c.items.clone())))
    }

    /// The response ended: its items join the conversation (unless it was deleted meanwhile;
    /// a file that cannot be written is logged: the response has been answered).
    pub fn commit(self, items: Vec<Value>) {
        let mut s = lock(&self.store);
        let bytes = size(&items);
        let dir = s.dir.clone();
        if let Some(c) = s.by_id.get_mut(&self.id) {
            c.items.extend(items);
            c.bytes += bytes;
            let _ = save(
                dir.as_deref(),
                &self.id,
                c.created_at,
                &c.metadata,
                c.items.iter().collect(),
            );
            s.bytes += bytes;
            s.evict(&self.id);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(c) = lock(&self.store).by_id.get_mut(&self.id) {
            c.busy = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn q(s: &str) -> ListQuery {
        parse_query(Some(s), |x| x.to_string()).unwrap()
    }

    #[test]
    fn a_conversation_keeps_its_items() {
        let mut s = Store::default();
        let c = s
            .create(
                "conv_1".into(),
                5,
                &body(json!({"items": [{"role": "user", "content": "Hi"},
                                       {"type": "message", "role": "assistant", "content": "Hello"}],
                              "metadata": {"topic": "greeting"}})),
            )
            .unwrap();
        assert_eq!(
            c,
            json!({"id": "conv_1", "object": "conversation", "created_at": 5,
                   "metadata": {"topic": "greeting"}})
        );
        let all = s.items("conv_1", &q("order=asc")).unwrap();
        let data = all["data"].as_array().unwrap();
        assert_eq!(data.len(), 2);
        // Ids and statuses are filled in; a string content becomes a text part.
        assert_eq!(data[0]["id"], "msg_1_0");
        assert_eq!(data[0]["status"], "completed");
        assert_eq!(
            data[0]["content"],
            json!([{"type": "input_text", "text": "Hi"}])
        );
        assert_eq!(data[1]["content"][0]["type"], "output_text");
        // Newest first by default; pages go on after an id.
        let page = s.items("conv_1", &q("limit=1")).unwrap();
        assert_eq!(page["data"][0]["id"], "msg_1_1");
        assert_eq!(page["has_more"], true);
        let next = s.items("conv_1", &q("limit=1&after=msg_1_1")).unwrap();
        assert_eq!(next["data"][0]["id"], "msg_1_0");
        assert_eq!(next["has_more"], false);
        // Added items come back as a list; an id already there is refused by name.
        let added = s
            .add(
                "conv_1",
                "x_",
                &body(json!({"items": [{"type": "function_call_output", "call_id": "c", "output": "1"}]})),
            )
            .unwrap();
        assert_eq!(added["data"][0]["id"], "fco_x_0");
        assert_eq!(added["first_id"], "fco_x_0");
        let e = s
            .add(
                "conv_1",
                "y_",
                &body(json!({"items": [{"id": "msg_1_0", "role": "user", "content": "again"}]})),
            )
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("items[0].id"), "{e:?}");
        assert_eq!(s.item("conv_1", "fco_x_0").unwrap()["output"], "1");
        // Deleting an item returns the conversation; the item is gone.
        let before = s.bytes;
        assert_eq!(s.delete_item("conv_1", "msg_1_0").unwrap()["id"], "conv_1");
        assert!(s.bytes < before);
        assert_eq!(s.item("conv_1", "msg_1_0").unwrap_err().status, 404);
        // Metadata is replaced whole.
        let u = s
            .update("conv_1", &body(json!({"metadata": {"a": "b"}})))
            .unwrap();
        assert_eq!(u["metadata"], json!({"a": "b"}));
        assert_eq!(
            s.delete("conv_1").unwrap(),
            json!({"id": "conv_1", "object": "conversation.deleted", "deleted": true})
        );
        assert_eq!(s.get("conv_1").unwrap_err().status, 404);
        assert_eq!(s.bytes, 0);
    }

    #[test]
    fn bad_requests_name_their_field() {
        let mut s = Store::default();
        let cases = [
            (json!({"items": "Hi"}), "items"),
            (
                json!({"items": [{"role": "robot", "content": "x"}]}),
                "items[0].role",
            ),
            (json!({"items": [{"type": "image"}]}), "items[0].type"),
            (
                json!({"items": [{"id": 3, "role": "user", "content": "x"}]}),
                "items[0].id",
            ),
            (
                json!({"items": [{"id": "a", "role": "user", "content": "x"},
                                 {"id": "a", "role": "user", "content": "y"}]}),
                "items[1].id",
            ),
            (json!({"items": vec![json!("x"); 21]}), "items"),
            (json!({"metadata": {"k": 1}}), "metadata.k"),
            (json!({"title": "x"}), "title"),
        ];
        for (b, param) in cases {
            let e = s.create("conv_x".into(), 0, &body(b.clone())).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{b}: {e:?}");
        }
        assert!(s.by_id.is_empty());
        s.create("conv_y".into(), 0, &body(json!({}))).unwrap();
        for (b, param) in [(json!({}), "items"), (json!({"items": []}), "items")] {
            let e = s.add("conv_y", "t", &body(b.clone())).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{b}: {e:?}");
        }
        assert_eq!(
            s.update("conv_y", &body(json!({})))
                .unwrap_err()
                .param
                .as_deref(),
            Some("metadata")
        );
        for bad in ["order=up", "limit=101", "colour=red"] {
            assert!(parse_query(Some(bad), |x| x.to_string()).is_err(), "{bad}");
        }
        assert!(
            parse_query(
                Some("include[]=message.output_text.logprobs&order=asc"),
                |x| x.to_string()
            )
            .unwrap()
            .ascending
        );
        assert_eq!(
            s.items("conv_y", &q("after=nope"))
                .unwrap_err()
                .param
                .as_deref(),
            Some("after")
        );
        assert_eq!(
            s.add("conv_z", "t", &body(json!({"items": ["x"]})))
                .unwrap_err()
                .status,
            404
        );
    }

    #[test]
    fn one_response_at_a_time_and_only_a_finished_one_adds() {
        let store = Arc::new(Mutex::new(Store::default()));
        lock(&store)
            .create(
                "conv_1".into(),
                0,
                &body(json!({"items": [{"role": "user", "content": "Hi"}]})),
            )
            .unwrap();
        assert!(Lease::take(&store, "conv_2").unwrap().is_none());
        let (lease, items) = Lease::take(&store, "conv_1").unwrap().unwrap();
        assert_eq!(items.len(), 1);
        let e = Lease::take(&store, "conv_1").err().unwrap();
        assert_eq!(e.status, StatusCode::CONFLICT);
        assert_eq!(e.code, Some("conversation_locked"));
        // Dropped: nothing added, free again.
        drop(lease);
        let (lease, _) = Lease::take(&store, "conv_1").unwrap().unwrap();
        lease.commit(vec![json!({"id": "msg_r", "type": "message"})]);
        let (lease, items) = Lease::take(&store, "conv_1").unwrap().unwrap();
        assert_eq!(items.len(), 2);
        // Deleted while a response ran: its commit goes nowhere.
        lock(&store).delete("conv_1").unwrap();
        lease.commit(vec![json!({"id": "msg_s"})]);
        assert!(lock(&store).by_id.is_empty());
        assert_eq!(lock(&store).bytes, 0);
    }

    #[test]
    fn on_disk_conversations_outlive_the_store_and_its_memory() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Mutex::new(Store::on_disk(dir.path()).unwrap()));
        let created = lock(&store)
            .create(
                "conv_1".into(),
                3,
                &body(
                    json!({"items": [{"role": "user", "content": "Hi"}], "metadata": {"a": "b"}}),
                ),
            )
            .unwrap();
        let (lease, _) = Lease::take(&store, "conv_1").unwrap().unwrap();
        lease.commit(vec![
            json!({"id": "msg_r", "type": "message", "role": "assistant",
                                 "content": [{"type": "output_text", "text": "Hello"}]}),
        ]);
        (lock(&store).add(
            "conv_1",
            "t_",
            &body(json!({"items": [{"role": "user", "content": "More"}, {"role": "user", "content": "Gone"}]})),
        ))
        .unwrap();
        lock(&store).delete_item("conv_1", "msg_t_1").unwrap();
        lock(&store)
            .update("conv_1", &body(json!({"metadata": {"a": "c"}})))
            .unwrap();
        let all = lock(&store).items("conv_1", &q("order=asc")).unwrap();
        assert_eq!(all["data"].as_array().unwrap().len(), 3);
        // A new store on the directory (a restart) finds it as it was.
        let mut again = Store::on_disk(dir.path()).unwrap();
        assert_eq!(
            again.get("conv_1").unwrap()["created_at"],
            created["created_at"]
        );
        assert_eq!(again.get("conv_1").unwrap()["metadata"], json!({"a": "c"}));
        assert_eq!(again.items("conv_1", &q("order=asc")).unwrap(), all);
        // Let go from memory, a conversation is read again from its file.
        for i in 0..CAPACITY + 1 {
            again
                .create(format!("conv_x{i}"), 0, &body(json!({})))
                .unwrap();
        }
        assert!(!again.by_id.contains_key("conv_1"));
        assert_eq!(again.items("conv_1", &q("order=asc")).unwrap(), all);
        // Deleted: its file goes. Ids that name no file are never looked for.
        again.delete("conv_1").unwrap();
        assert!(!dir.path().join("conv_1.json").exists());
        assert_eq!(
            Store::on_disk(dir.path())
                .unwrap()
                .get("conv_1")
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(again.get("../conv_x1").unwrap_err().status, 404);
        // A damaged file is an error that says so, not an empty conversation.
        std::fs::write(dir.path().join("conv_bad.json"), b"{").unwrap();
        let e = again.get("conv_bad").unwrap_err();
        assert_eq!(e.status, 500);
        assert!(e.message.contains("damaged"), "{e:?}");
        // A write that fails changes nothing.
        let gone = tempfile::tempdir().unwrap();
        let path = gone.path().join("d");
        let mut s = Store::on_disk(&path).unwrap();
        s.create("conv_2".into(), 0, &body(json!({}))).unwrap();
        std::fs::remove_dir_all(&path).unwrap();
        std::fs::write(&path, b"not a directory").unwrap();
        let e = s
            .add(
                "conv_2",
                "t_",
                &body(json!({"items": [{"role": "user", "content": "x"}]})),
            )
            .unwrap_err();
        assert_eq!(e.status, 500);
        assert!(
            s.items("conv_2", &q("")).unwrap()["data"]
                .as_array()
                .unwrap()
                .is_empty()
        );
        assert!(s.create("conv_3".into(), 0, &body(json!({}))).is_err());
        assert!(!s.by_id.contains_key("conv_3"));
    }

    #[test]
    fn the_least_recently_used_go_first() {
        let mut s = Store::default();
        for i in 0..CAPACITY + 2 {
            s.create(format!("c{i}"), 0, &body(json!({}))).unwrap();
            if i == 0 {
                continue;
            }
            // c0 is used all along: it stays.
            s.get("c0").unwrap();
        }
        assert!(s.get("c0").is_ok());
        assert!(s.get("c1").is_err() && s.get("c2").is_err());
        assert!(s.get("c3").is_ok());
        // Bytes too.
        let big = "x".repeat(BYTES / 3);
        for i in 0..4 {
            s.create(
                format!("b{i}"),
                0,
                &body(json!({"items": [{"role": "user", "content": big}]})),
            )
            .unwrap();
        }
        assert!(s.get("b0").is_err());
        assert!(s.get("b3").is_ok() && s.get("b2").is_ok());
        assert!(s.bytes <= BYTES);
    }
}
