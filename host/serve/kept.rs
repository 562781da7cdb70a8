//! A bounded map of what the server keeps in memory for its clients (stored responses, stored
//! chat completions): at most `capacity` entries and `max_bytes` bytes of them (as the owner
//! measures each), the oldest going first.

use std::collections::{HashMap, VecDeque};

pub struct Kept<T> {
    by_id: HashMap<String, (T, usize)>,
    /// Oldest first.
    order: VecDeque<String>,
    bytes: usize,
    capacity: usize,
    max_bytes: usize,
}

impl<T> Kept<T> {
    pub fn new(capacity: usize, max_bytes: usize) -> Kept<T> {
        Kept {
            by_id: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            capacity,
            max_bytes,
        }
    }

    /// Keeps `value` (`bytes` large) as the newest, replacing one with its id; the oldest go
    /// until the bounds hold.
    pub fn insert(&mut self, id: String, value: T, bytes: usize) {
        self.remove(&id);
        self.by_id.insert(id.clone(), (value, bytes));
        self.order.push_back(id);
        self.bytes += bytes;
        while self.order.len() > self.capacity || self.bytes > self.max_bytes {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some((_, b)) = self.by_id.remove(&old) {
                self.bytes -= b;
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<&T> {
        self.by_id.get(id).map(|(v, _)| v)
    }

    /// For changes that keep its size about the same (metadata).
    pub fn get_mut(&mut self, id: &str) -> Option<&mut T> {
        self.by_id.get_mut(id).map(|(v, _)| v)
    }

    pub fn remove(&mut self, id: &str) -> Option<T> {
        let (v, b) = self.by_id.remove(id)?;
        self.bytes -= b;
        self.order.retain(|x| x != id);
        Some(v)
    }

    /// Oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &T)> {
        (self.order.iter()).filter_map(|id| self.by_id.get(id).map(|(v, _)| (id, v)))
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_go_first_within_both_bounds() {
        let mut k = Kept::new(3, 100);
        for i in 0..5 {
            k.insert(format!("r{i}"), i, 10);
        }
        assert!(k.get("r1").is_none() && k.get("r2") == Some(&2));
        assert_eq!(k.iter().map(|(_, v)| *v).collect::<Vec<_>>(), [2, 3, 4]);
        // Replacing one makes it the newest.
        k.insert("r2".into(), 20, 10);
        assert_eq!(k.iter().map(|(_, v)| *v).collect::<Vec<_>>(), [3, 4, 20]);
        // Bytes: a big one pushes the oldest out.
        k.insert("big".into(), 99, 85);
        assert!(k.get("r3").is_none() && k.get("r4").is_none());
        assert_eq!(k.bytes(), 95);
        assert_eq!(k.remove("big"), Some(99));
        assert_eq!(k.bytes(), 10);
        *k.get_mut("r2").unwrap() = 21;
        assert_eq!(k.get("r2"), Some(&21));
    }
}
