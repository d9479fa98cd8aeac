//! Core's answers, checked before they act: one answer that would take most of a location's
//! gateways away at once (an empty list while Core restarts, a partial one from a half-migrated
//! database) is held until that many answers in a row agree; anything else is acted on at once.

use std::collections::BTreeSet;

use crate::config::Location;

/// An answer's gateway names by location: two answers that agree on it are the same answer.
type Shape = Vec<(String, BTreeSet<String>)>;

/// The gateway list the sidecar acts on, and a suspicious answer waiting for confirmation.
pub struct Answers {
    confirm_drops: u32,
    accepted: Option<Vec<Location>>,
    /// The held answer's gateways by location, and how many answers in a row said it.
    held: Option<(Shape, u32)>,
}

/// What to do with an answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Act on it.
    Accept,
    /// Keep acting on the last accepted list: this answer drops most of `location`'s gateways
    /// (`dropped` of `had`), and `seen` answers in a row have said so.
    Hold {
        location: String,
        dropped: usize,
        had: usize,
        seen: u32,
    },
}

impl Answers {
    pub fn new(confirm_drops: u32) -> Answers {
        Answers {
            confirm_drops,
            accepted: None,
            held: None,
        }
    }

    pub fn confirm_drops(&self) -> u32 {
        self.confirm_drops
    }

    /// The list acted on now (empty before Core first answered).
    pub fn accepted(&self) -> &[Location] {
        self.accepted.as_deref().unwrap_or_default()
    }

    /// Takes Core's latest answer: accepted (and the list acted on from now), or held.
    pub fn answer(&mut self, found: Vec<Location>) -> Verdict {
        let Some(drop) = self.drops_most(&found) else {
            self.held = None;
            self.accepted = Some(found);
            return Verdict::Accept;
        };
        let shape = shape(&found);
        let seen = match self.held.take() {
            Some((held, seen)) if held == shape => seen + 1,
            _ => 1,
        };
        if seen >= self.confirm_drops {
            self.accepted = Some(found);
            return Verdict::Accept;
        }
        self.held = Some((shape, seen));
        let (location, dropped, had) = drop;
        Verdict::Hold {
            location,
            dropped,
            had,
            seen,
        }
    }

    /// The first location of which `found` drops more than half the gateways accepted before.
    fn drops_most(&self, found: &[Location]) -> Option<(String, usize, usize)> {
        self.accepted().iter().find_map(|before| {
            let now = found.iter().find(|l| l.name == before.name);
            let had = before.gateways.len();
            let dropped = before
                .gateways
                .iter()
                .filter(|g| now.is_none_or(|l| !l.gateways.iter().any(|n| n.name == g.name)))
                .count();
            (had > 0 && dropped * 2 > had).then(|| (before.name.clone(), dropped, had))
        })
    }
}

fn shape(found: &[Location]) -> Shape {
    found
        .iter()
        .map(|l| {
            let names = l.gateways.iter().map(|g| g.name.clone()).collect();
            (l.name.clone(), names)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Gateway;

    fn location(name: &str, gateways: &[&str]) -> Location {
        Location {
            name: name.into(),
            public_key: None,
            mfa: false,
            core_id: Some(1),
            gateways: gateways
                .iter()
                .enumerate()
                .map(|(i, g)| Gateway {
                    name: g.to_string(),
                    address: format!("10.0.0.{}:51820", i + 1).parse().unwrap(),
                    health_port: None,
                    core_id: None,
                    core_connected: None,
                })
                .collect(),
        }
    }

    fn names(answers: &Answers) -> Vec<String> {
        answers
            .accepted()
            .iter()
            .flat_map(|l| l.gateways.iter().map(|g| format!("{}/{}", l.name, g.name)))
            .collect()
    }

    #[test]
    fn an_answer_that_drops_most_of_a_pool_waits_until_it_repeats() {
        let mut answers = Answers::new(3);
        let three = || vec![location("office", &["gw0", "gw1", "gw2"])];
        assert_eq!(answers.answer(three()), Verdict::Accept, "the first answer");
        // One gateway of three goes: acted on at once.
        assert_eq!(
            answers.answer(vec![location("office", &["gw0", "gw2"])]),
            Verdict::Accept
        );
        assert_eq!(answers.answer(three()), Verdict::Accept, "listed again");
        // An empty answer (Core restarting) drops them all: held twice, then believed.
        for seen in 1..3 {
            assert_eq!(
                answers.answer(Vec::new()),
                Verdict::Hold {
                    location: "office".into(),
                    dropped: 3,
                    had: 3,
                    seen
                }
            );
            assert_eq!(names(&answers).len(), 3, "still acting on the last list");
        }
        assert_eq!(answers.answer(Vec::new()), Verdict::Accept);
        assert!(names(&answers).is_empty());
    }

    #[test]
    fn a_held_answer_counts_only_while_answers_agree() {
        let mut answers = Answers::new(2);
        answers.answer(vec![
            location("office", &["a", "b", "c"]),
            location("lab", &["x"]),
        ]);
        let partial = || vec![location("office", &["a"]), location("lab", &["x"])];
        assert!(matches!(
            answers.answer(partial()),
            Verdict::Hold { seen: 1, .. }
        ));
        // Another drop in between starts the count over.
        let other = vec![location("office", &["b"]), location("lab", &["x"])];
        assert!(matches!(
            answers.answer(other),
            Verdict::Hold { seen: 1, .. }
        ));
        assert!(matches!(
            answers.answer(partial()),
            Verdict::Hold { seen: 1, .. }
        ));
        assert_eq!(answers.answer(partial()), Verdict::Accept);
        assert_eq!(names(&answers), ["office/a", "lab/x"]);
        // A whole location gone is its whole pool dropped.
        assert!(matches!(
            answers.answer(vec![location("office", &["a"])]),
            Verdict::Hold { ref location, dropped: 1, had: 1, .. } if location == "lab"
        ));
        // With 1, every answer is acted on.
        let mut eager = Answers::new(1);
        eager.answer(vec![location("office", &["a", "b"])]);
        assert_eq!(eager.answer(Vec::new()), Verdict::Accept);
    }
}
