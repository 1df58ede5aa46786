//! The stage graph (petgraph): cycle reports, target selection and text/dot/mermaid output.
//! Node indices equal the stages' positions in `Pipeline::stages`.

use std::collections::BTreeSet;

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::Direction;

use crate::config::Pipeline;
use crate::error::PipeError;

pub struct Dag {
    graph: DiGraph<usize, ()>,
    /// Stage indices, upstream before downstream (ties in file order).
    pub order: Vec<usize>,
}

impl Dag {
    /// Builds the graph; a cycle is a config error that prints it (`a -> b -> a`).
    pub fn build(pipeline: &Pipeline) -> Result<Dag, PipeError> {
        let mut graph = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..pipeline.stages.len())
            .map(|i| graph.add_node(i))
            .collect();
        for (i, stage) in pipeline.stages.iter().enumerate() {
            for up in stage.upstream() {
                if let Some(j) = pipeline.index_of(up) {
                    graph.update_edge(nodes[j], nodes[i], ());
                }
            }
        }
        if toposort(&graph, None).is_err() {
            let cycle = find_cycle(&graph)
                .into_iter()
                .map(|i| pipeline.stages[i].name.as_str())
                .collect::<Vec<_>>();
            let at = cycle
                .first()
                .and_then(|n| pipeline.stage(n))
                .map(|s| s.at.as_str())
                .unwrap_or("pipeline file");
            return Err(PipeError::Config(format!(
                "{at}: dependency cycle: {}",
                cycle.join(" -> ")
            )));
        }
        let order = stable_topo_order(&graph);
        Ok(Dag { graph, order })
    }

    pub fn parents(&self, i: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .graph
            .neighbors_directed(NodeIndex::new(i), Direction::Incoming)
            .map(|n| n.index())
            .collect();
        v.sort();
        v
    }

    pub fn children(&self, i: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .graph
            .neighbors_directed(NodeIndex::new(i), Direction::Outgoing)
            .map(|n| n.index())
            .collect();
        v.sort();
        v
    }

    /// The targets and everything upstream of them (all stages when `targets` is empty).
    pub fn select(&self, targets: &[usize]) -> BTreeSet<usize> {
        if targets.is_empty() {
            return (0..self.graph.node_count()).collect();
        }
        let mut selected = BTreeSet::new();
        let mut stack: Vec<usize> = targets.to_vec();
        while let Some(i) = stack.pop() {
            if selected.insert(i) {
                stack.extend(self.parents(i));
            }
        }
        selected
    }

    /// Text: one line per stage in run order, with what it waits for.
    pub fn render_text(&self, pipeline: &Pipeline) -> String {
        let width = pipeline
            .stages
            .iter()
            .map(|s| s.name.len())
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        for &i in &self.order {
            let s = &pipeline.stages[i];
            let parents: Vec<&str> = self
                .parents(i)
                .into_iter()
                .map(|p| pipeline.stages[p].name.as_str())
                .collect();
            let arrow = if parents.is_empty() {
                String::new()
            } else {
                format!("  <- {}", parents.join(", "))
            };
            out.push_str(&format!("{:width$}  [{}]{arrow}\n", s.name, s.kind_name()));
        }
        out
    }

    pub fn render_dot(&self, pipeline: &Pipeline) -> String {
        let mut out = String::from("digraph pipeline {\n  rankdir=LR;\n  node [shape=box];\n");
        for &i in &self.order {
            let s = &pipeline.stages[i];
            out.push_str(&format!(
                "  \"{}\" [label=\"{}\\n({})\"];\n",
                s.name,
                s.name,
                s.kind_name()
            ));
        }
        for &i in &self.order {
            for p in self.parents(i) {
                out.push_str(&format!(
                    "  \"{}\" -> \"{}\";\n",
                    pipeline.stages[p].name, pipeline.stages[i].name
                ));
            }
        }
        out.push_str("}\n");
        out
    }

    pub fn render_mermaid(&self, pipeline: &Pipeline) -> String {
        // Mermaid ids cannot hold every character a stage name may; use positions.
        let mut out = String::from("flowchart TD\n");
        for &i in &self.order {
            let s = &pipeline.stages[i];
            out.push_str(&format!("  s{i}[\"{} ({})\"]\n", s.name, s.kind_name()));
        }
        for &i in &self.order {
            for p in self.parents(i) {
                out.push_str(&format!("  s{p} --> s{i}\n"));
            }
        }
        out
    }
}

/// Kahn's algorithm taking the lowest ready index first, so order follows the file.
fn stable_topo_order(graph: &DiGraph<usize, ()>) -> Vec<usize> {
    let n = graph.node_count();
    let mut indegree: Vec<usize> = (0..n)
        .map(|i| {
            graph
                .neighbors_directed(NodeIndex::new(i), Direction::Incoming)
                .count()
        })
        .collect();
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for c in graph.neighbors_directed(NodeIndex::new(i), Direction::Outgoing) {
            indegree[c.index()] -= 1;
            if indegree[c.index()] == 0 {
                ready.insert(c.index());
            }
        }
    }
    order
}

/// One cycle as a closed walk of stage indices (first == last).
fn find_cycle(graph: &DiGraph<usize, ()>) -> Vec<usize> {
    for scc in tarjan_scc(graph) {
        let self_loop = scc.len() == 1 && graph.contains_edge(scc[0], scc[0]);
        if scc.len() < 2 && !self_loop {
            continue;
        }
        let members: BTreeSet<NodeIndex> = scc.iter().copied().collect();
        let start = *members.iter().min().unwrap_or(&scc[0]);
        // Depth-first walk inside the component back to `start`.
        let mut path = vec![start];
        let mut visited = BTreeSet::from([start]);
        if walk(graph, &members, start, &mut path, &mut visited) {
            return path.into_iter().map(|n| n.index()).collect();
        }
    }
    Vec::new()
}

fn walk(
    graph: &DiGraph<usize, ()>,
    members: &BTreeSet<NodeIndex>,
    start: NodeIndex,
    path: &mut Vec<NodeIndex>,
    visited: &mut BTreeSet<NodeIndex>,
) -> bool {
    let Some(&here) = path.last() else {
        return false;
    };
    let mut next: Vec<NodeIndex> = graph
        .neighbors(here)
        .filter(|n| members.contains(n))
        .collect();
    next.sort();
    for n in next {
        if n == start {
            path.push(n);
            return true;
        }
        if visited.insert(n) {
            path.push(n);
            if walk(graph, members, start, path, visited) {
                return true;
            }
            path.pop();
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    fn pipeline(text: &str) -> Result<Pipeline, PipeError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pipeline.toml");
        std::fs::write(&file, text).unwrap();
        crate::config::load(&file, &[], &Registry::default())
    }

    const DIAMOND: &str = r#"
[stages.a]
cmd = "true"
outs = ["a.txt"]
[stages.b]
cmd = "true"
needs = ["a"]
[stages.c]
cmd = "true"
deps = ["a.txt"]
[stages.d]
cmd = "true"
needs = ["b", "c"]
[stages.e]
cmd = "true"
"#;

    fn names(p: &Pipeline, set: impl IntoIterator<Item = usize>) -> Vec<String> {
        set.into_iter().map(|i| p.stages[i].name.clone()).collect()
    }

    #[test]
    fn order_puts_upstream_first() {
        let p = pipeline(DIAMOND).unwrap();
        let dag = Dag::build(&p).unwrap();
        assert_eq!(names(&p, dag.order.clone()), ["a", "b", "c", "d", "e"]);
        assert_eq!(names(&p, dag.parents(3)), ["b", "c"]);
        assert_eq!(
            names(&p, dag.children(0)),
            ["b", "c"],
            "deps on a's outs imply an edge"
        );
    }

    #[test]
    fn selection_takes_upstream_only() {
        let p = pipeline(DIAMOND).unwrap();
        let dag = Dag::build(&p).unwrap();
        assert_eq!(names(&p, dag.select(&[1])), ["a", "b"]);
        assert_eq!(names(&p, dag.select(&[3])), ["a", "b", "c", "d"]);
        assert_eq!(names(&p, dag.select(&[4])), ["e"]);
        assert_eq!(dag.select(&[]).len(), 5);
    }

    #[test]
    fn cycle_is_printed() {
        let err = pipeline("[stages.a]\ncmd='x'\nneeds=['b']\n[stages.b]\ncmd='y'\nneeds=['a']\n")
            .map(|p| Dag::build(&p).map(|_| ()));
        let msg = match err {
            Ok(Err(e)) | Err(e) => e.to_string(),
            Ok(Ok(())) => panic!("cycle accepted"),
        };
        assert!(msg.contains("a -> b -> a"), "{msg}");
    }

    #[test]
    fn renders_all_formats() {
        let p = pipeline(DIAMOND).unwrap();
        let dag = Dag::build(&p).unwrap();
        assert!(dag.render_dot(&p).contains("\"b\" -> \"d\";"));
        assert!(dag.render_mermaid(&p).contains("s2 --> s3"));
        assert!(dag.render_text(&p).contains("d  [cmd]  <- b, c"));
    }
}
