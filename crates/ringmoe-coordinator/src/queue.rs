//! The job queue: highest priority first, then submission order (lower id first).
//!
//! Jobs leave it in this order for a free worker group (`--group-workers`; by default one group
//! of every live worker, so one job at a time); the rest wait here.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};

use crate::store::JobId;

#[derive(Debug, Default)]
pub struct Queue {
    order: BTreeSet<(Reverse<i32>, JobId)>,
    priority: HashMap<JobId, i32>,
}

impl Queue {
    /// Queues `id` (again: a re-push with another priority moves it).
    pub fn push(&mut self, id: JobId, priority: i32) {
        self.remove(id);
        self.order.insert((Reverse(priority), id));
        self.priority.insert(id, priority);
    }

    /// Takes `id` out of the queue; whether it was queued.
    pub fn remove(&mut self, id: JobId) -> bool {
        match self.priority.remove(&id) {
            Some(p) => self.order.remove(&(Reverse(p), id)),
            None => false,
        }
    }

    /// The job that runs next, without taking it.
    pub fn peek(&self) -> Option<JobId> {
        self.order.first().map(|&(_, id)| id)
    }

    pub fn pop(&mut self) -> Option<JobId> {
        let id = self.peek()?;
        self.remove(id);
        Some(id)
    }

    pub fn contains(&self, id: JobId) -> bool {
        self.priority.contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Queued jobs in the order they will run.
    pub fn iter(&self) -> impl Iterator<Item = JobId> + '_ {
        self.order.iter().map(|&(_, id)| id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_priority_first_then_submission_order() {
        let mut q = Queue::default();
        for (id, p) in [(1, 0), (2, 5), (3, 0), (4, 5), (5, -1)] {
            q.push(id, p);
        }
        assert_eq!(q.iter().collect::<Vec<_>>(), vec![2, 4, 1, 3, 5]);
        assert!(q.remove(4));
        assert!(!q.remove(4));
        q.push(5, 9);
        assert_eq!(q.pop(), Some(5));
        assert_eq!(q.pop(), Some(2));
        assert_eq!(q.len(), 2);
        assert!(q.contains(1) && !q.contains(2));
    }
}
