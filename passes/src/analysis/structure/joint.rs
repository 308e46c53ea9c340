//! Step 2b of discovery: MMDiT (SD3, SD3.5, Flux), found by structure alone.
//!
//! 1. *Two streams.* Two chains of residual adds computed from disjoint graph inputs (the latent;
//!    the text embedding), each with adds whose branch reads the other (the joint attention).
//!    The image stream is the one computed from the latent (the input shaped like the output).
//! 2. *Double blocks.* On each stream a block starts at every add whose branch reads the other
//!    stream: one joint attention per block, then the stream's own sub-layers (SD3.5's extra
//!    image self-attention among them). The text stream may have one block fewer: SD3's last
//!    block writes no text (`context_pre_only`).
//! 3. *Single blocks.* Residual adds after the double blocks on a token-axis Concat of the two
//!    streams' last tensors (Flux): a block starts at every add with attention. Between single
//!    blocks the joint stream is either passed on (diffusers ≤ 0.34, one Concat before and one
//!    Slice after all of them) or sliced into text and image and concatenated again (≥ 0.35).
//!    After the last one, the Slice (or Split output) that reaches the output is the image.
//! 4. *Cores.* Block l is every node on a data path from its stream tensors to the next
//!    block's; every node between the first block's streams and the output must fall in exactly
//!    one block (or after the last), else a path bypasses a boundary and the model is refused.

use super::*;

/// A stream as a chain of residual adds.
struct Chain<'c> {
    adds: &'c [usize],
    /// The graph inputs its first tensor is computed from.
    roots: Vec<String>,
}

impl Discovery<'_> {
    /// The joint stack, when the model has two streams that attend to each other; `Ok(None)`
    /// when it has not (a single-stream DiT), an error when it has but their layout is not one
    /// this discovery can follow.
    pub(super) fn joint_stack(
        &self,
        residuals: &[Residual],
        chains: &[Vec<usize>],
    ) -> Result<Option<DitStack>, StructureError> {
        let Some((image, text)) = self.stream_pair(residuals, chains) else {
            return Ok(None);
        };
        let image_start = residuals[image.adds[0]].skip.clone();
        let text_start = residuals[text.adds[0]].skip.clone();
        let image_desc = self.flow.data_descendants(&[&image_start]);
        let text_desc = self.flow.data_descendants(&[&text_start]);
        let image_blocks = self.joint_groups(residuals, image.adds, &text_start, &text_desc);
        let text_blocks = self.joint_groups(residuals, text.adds, &image_start, &image_desc);
        let refuse = |why: String| Err(StructureError::DualStreamUnsupported(why));
        if image_blocks.is_empty() || text_blocks.is_empty() {
            return refuse(format!(
                "the streams from '{image_start}' and '{text_start}' read each other, but their first residual adds are not a joint attention"
            ));
        }
        let doubles = image_blocks.len();
        if !(text_blocks.len() == doubles || text_blocks.len() + 1 == doubles) {
            return refuse(format!(
                "the image stream has {doubles} joint attentions and the text stream {}; a double block has one on each (the last may write no text)",
                text_blocks.len()
            ));
        }
        let image_out = residuals[*image.adds.last().unwrap()].out.clone();
        let text_out = residuals[*text.adds.last().unwrap()].out.clone();
        let last_double = image
            .adds
            .iter()
            .chain(text.adds)
            .map(|&r| residuals[r].pos)
            .max()
            .unwrap();
        let singles = self.single_groups(residuals, image.adds, text.adds, last_double)?;

        // The stream tensors between blocks: (image, text) after each.
        let mut plans: Vec<BlockPlan> = Vec::new();
        let first_input = |group: &Vec<usize>| residuals[group[0]].skip.clone();
        let single_links = match singles.first() {
            Some(first) => {
                Some(self.single_links(residuals, &singles, first, &image_out, &text_out)?)
            }
            None => None,
        };
        for (k, group) in image_blocks.iter().enumerate() {
            let last = k + 1 == doubles;
            let (output, text_output) = match (last, &single_links) {
                (false, _) => (
                    first_input(&image_blocks[k + 1]),
                    Some(text_blocks.get(k + 1).map_or(text_out.clone(), first_input)),
                ),
                (true, Some(links)) => (links.entries[0].0.clone(), links.entries[0].1.clone()),
                (true, None) => (image_out.clone(), None),
            };
            let text_input = text_blocks.get(k).map_or(text_out.clone(), first_input);
            plans.push(BlockPlan {
                input: first_input(group),
                output,
                text_input: Some(text_input),
                text_output,
                kind: BlockKind::Double,
                sublayers: self.sublayers(residuals, group, &text_start, &text_desc),
                core: Vec::new(),
            });
        }
        let mut joint = Joint {
            text_input: text_start.clone(),
            double_blocks: doubles,
            single_blocks: singles.len(),
            image_first: None,
            joined_once: false,
            text_tokens: self.stream_dims(&text_start, &text_start).1,
        };
        if let Some(links) = &single_links {
            joint.image_first = Some(links.image_first);
            joint.joined_once = links.joined_once;
            for (j, group) in singles.iter().enumerate() {
                let (input, text_input) = links.entries[j].clone();
                let (output, text_output) = links.entries[j + 1].clone();
                plans.push(BlockPlan {
                    input,
                    output,
                    text_input,
                    text_output,
                    kind: BlockKind::Single,
                    sublayers: self.sublayers(residuals, group, &text_start, &text_desc),
                    core: Vec::new(),
                });
            }
        }
        let stack_output = plans.last().unwrap().output.clone();
        let final_core = self.assign_cores(&mut plans, &stack_output)?;
        let latent = self.pick_latent(&image.roots);
        let mut notes = vec![format!(
            "two residual streams read each other (MMDiT): image from '{image_start}', text from '{text_start}'"
        )];
        if text_blocks.len() < doubles {
            notes.push(format!(
                "block {} writes no text (context_pre_only): only its image output is read",
                doubles - 1
            ));
        }
        Ok(Some(self.assemble(Assembly {
            entries: vec![image_start, text_start],
            stack_output,
            plans,
            final_core,
            latent,
            text_inputs: text.roots,
            joint: Some(joint),
            notes,
        })))
    }

    /// Two chains computed from disjoint graph inputs whose adds read each other: (image, text).
    fn stream_pair<'c>(
        &self,
        residuals: &[Residual],
        chains: &'c [Vec<usize>],
    ) -> Option<(Chain<'c>, Chain<'c>)> {
        let chain = |c: &'c Vec<usize>| Chain {
            adds: c.as_slice(),
            roots: self.roots(&residuals[c[0]].skip),
        };
        let mut best: Option<(usize, Chain<'c>, Chain<'c>)> = None;
        for (i, a) in chains.iter().enumerate() {
            for b in &chains[i + 1..] {
                let (a, b) = (chain(a), chain(b));
                if a.roots.is_empty()
                    || b.roots.is_empty()
                    || a.roots.iter().any(|r| b.roots.contains(r))
                    || self.feeds(residuals, a.adds, b.adds) == 0
                    || self.feeds(residuals, b.adds, a.adds) == 0
                {
                    continue;
                }
                let size = a.adds.len() + b.adds.len();
                if best.as_ref().is_none_or(|(s, _, _)| size > *s) {
                    let (image, text) =
                        if self.latent_score(&a.roots) >= self.latent_score(&b.roots) {
                            (a, b)
                        } else {
                            (b, a)
                        };
                    best = Some((size, image, text));
                }
            }
        }
        best.map(|(_, image, text)| (image, text))
    }

    /// The graph inputs a value is computed from (itself, if it is one).
    fn roots(&self, value: &str) -> Vec<String> {
        if self.flow.graph.is_input(value) {
            return vec![value.to_string()];
        }
        self.flow
            .data_inputs_of(&self.flow.data_ancestors(&self.producer_list(value)))
    }

    /// How latent-like a stream's inputs are: an input shaped like a graph output (the model
    /// predicts noise or velocity of the latent's shape), then the highest rank.
    fn latent_score(&self, roots: &[String]) -> (bool, usize) {
        let outputs: Vec<&[Dim]> = self
            .flow
            .result_outputs()
            .iter()
            .filter_map(|o| self.shapes.dims(o))
            .collect();
        roots
            .iter()
            .map(|r| {
                let dims = self.shapes.dims(r);
                let shaped_like_output = dims.is_some_and(|d| {
                    outputs
                        .iter()
                        .any(|o| o.len() == d.len() && o.iter().zip(d).all(|(a, b)| a == b))
                });
                (shaped_like_output, dims.map_or(0, |d| d.len()))
            })
            .max()
            .unwrap_or((false, 0))
    }

    /// Whether residual add `r`'s branch reads, from outside the branch, data computed from the
    /// stream that starts at `start` (`downstream`: the nodes computed from it).
    pub(super) fn reads_stream(&self, r: &Residual, start: &str, downstream: &[bool]) -> bool {
        let flow = &self.flow;
        let branch: HashSet<usize> = r.branch.iter().copied().collect();
        r.branch.iter().any(|&q| {
            flow.reads[q].iter().any(|v| {
                if *v == r.skip || !flow.is_data(v) {
                    return false;
                }
                match flow.producer(v) {
                    Some(p) => !branch.contains(&p) && downstream[p],
                    None => v == start,
                }
            })
        })
    }

    /// A stream's adds grouped into double blocks: a block starts at each joint attention (an
    /// add reading the other stream). Empty when the first add is not one.
    fn joint_groups(
        &self,
        residuals: &[Residual],
        adds: &[usize],
        other_start: &str,
        other_desc: &[bool],
    ) -> Vec<Vec<usize>> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for &r in adds {
            if self.reads_stream(&residuals[r], other_start, other_desc) {
                groups.push(vec![r]);
            } else if let Some(group) = groups.last_mut() {
                group.push(r);
            } else {
                return Vec::new();
            }
        }
        groups
    }

    /// The residual adds after the double blocks on the way to the output, grouped into single
    /// blocks: one starts at each add whose branch holds an attention (a Softmax).
    fn single_groups(
        &self,
        residuals: &[Residual],
        image: &[usize],
        text: &[usize],
        last_double: usize,
    ) -> Result<Vec<Vec<usize>>, StructureError> {
        let flow = &self.flow;
        let to_out = self.reaching_output();
        let mut later: Vec<usize> = (0..residuals.len())
            .filter(|r| !image.contains(r) && !text.contains(r))
            .filter(|&r| residuals[r].pos > last_double && to_out[residuals[r].pos])
            .collect();
        later.sort_by_key(|&r| residuals[r].pos);
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for r in later {
            let attention = residuals[r]
                .branch
                .iter()
                .any(|&q| flow.node(q).op_type == "Softmax");
            match groups.last_mut() {
                Some(group) if !attention => group.push(r),
                _ if attention => groups.push(vec![r]),
                _ => {
                    return Err(StructureError::DualStreamUnsupported(format!(
                        "the residual add '{}' after the double blocks has no attention before it",
                        residuals[r].out
                    )));
                }
            }
        }
        Ok(groups)
    }

    /// The value behind Cast/Identity nodes.
    fn through(&self, value: &str) -> String {
        let mut value = value.to_string();
        while let Some(p) = self.flow.producer(&value) {
            let node = self.flow.node(p);
            if !matches!(node.op_type.as_str(), "Cast" | "Identity") || node.inputs.is_empty() {
                break;
            }
            value = node.inputs[0].clone();
        }
        value
    }

    /// The two data operands of a token-axis Concat behind `value`, if it is one.
    fn token_concat(&self, value: &str) -> Option<[String; 2]> {
        let p = self.flow.producer(&self.through(value))?;
        let node = self.flow.node(p);
        let data: Vec<&String> = node
            .inputs
            .iter()
            .filter(|i| self.flow.is_data(i))
            .collect();
        let axis = node.attr_int("axis")?;
        let rank = self
            .shapes
            .dims(node.outputs.first()?)
            .map(|d| d.len() as i64);
        let token_axis = axis == 1 || rank.is_some_and(|r| axis == 1 - r);
        (node.op_type == "Concat" && data.len() == 2 && node.inputs.len() == 2 && token_axis)
            .then(|| [data[0].clone(), data[1].clone()])
    }

    /// The tensor a Slice or Split behind `value` cuts tokens from.
    fn sliced_from(&self, value: &str) -> Option<String> {
        let p = self.flow.producer(&self.through(value))?;
        let node = self.flow.node(p);
        let input = node.inputs.first()?;
        matches!(node.op_type.as_str(), "Slice" | "Split").then(|| self.through(input))
    }

    /// How the single blocks pass the streams on: the (image or joint, text) tensors each reads,
    /// and last the image tensor after them.
    fn single_links(
        &self,
        residuals: &[Residual],
        singles: &[Vec<usize>],
        first: &[usize],
        image_out: &str,
        text_out: &str,
    ) -> Result<SingleLinks, StructureError> {
        let refuse = |why: String| Err(StructureError::DualStreamUnsupported(why));
        let x0 = &residuals[first[0]].skip;
        let Some([a, b]) = self.token_concat(x0) else {
            return refuse(format!(
                "the first single block's stream '{x0}' is not a token-axis Concat of the image and text streams"
            ));
        };
        let (image, text) = (self.through(image_out), self.through(text_out));
        let image_first = match (self.through(&a), self.through(&b)) {
            (i, t) if i == image && t == text => true,
            (t, i) if i == image && t == text => false,
            _ => {
                return refuse(format!(
                    "the first single block's stream '{x0}' joins '{a}' and '{b}', not the last double block's image and text"
                ));
            }
        };
        let split = |[a, b]: [String; 2]| {
            if image_first {
                (a, Some(b))
            } else {
                (b, Some(a))
            }
        };
        let mut entries = vec![split([a, b])];
        let mut joined_once = None;
        for (j, group) in singles.iter().enumerate() {
            let x_out = self.through(&residuals[*group.last().unwrap()].out);
            let (entry, once) = match singles.get(j + 1) {
                Some(next) => {
                    let x_in = &residuals[next[0]].skip;
                    if self.through(x_in) == x_out {
                        ((x_in.clone(), None), true)
                    } else {
                        match self.token_concat(x_in) {
                            Some([a, b])
                                if self.sliced_from(&a).as_deref() == Some(&x_out)
                                    && self.sliced_from(&b).as_deref() == Some(&x_out) =>
                            {
                                (split([a, b]), false)
                            }
                            _ => {
                                return refuse(format!(
                                    "single block {j}'s output '{x_out}' reaches the next single block neither directly nor sliced into text and image and joined again"
                                ));
                            }
                        }
                    }
                }
                None => (
                    (self.image_slice(&x_out)?, None),
                    joined_once.unwrap_or(false),
                ),
            };
            if singles.get(j + 1).is_some() && joined_once.is_some_and(|o| o != once) {
                return refuse(format!(
                    "single block {j} passes the streams on differently from the blocks before it"
                ));
            }
            joined_once = Some(once);
            entries.push(entry);
        }
        Ok(SingleLinks {
            entries,
            image_first,
            joined_once: joined_once.unwrap_or(false),
        })
    }

    /// After the last single block: the one Slice (or Split output) of its stream that reaches
    /// the output, the image tokens.
    fn image_slice(&self, x_out: &str) -> Result<String, StructureError> {
        let flow = &self.flow;
        let to_out = self.reaching_output();
        let mut readers: Vec<usize> = flow.data_readers(x_out);
        // Through the casts an export may put on the stream.
        let mut k = 0;
        while k < readers.len() {
            let node = flow.node(readers[k]);
            if matches!(node.op_type.as_str(), "Cast" | "Identity")
                && let Some(out) = node.outputs.first()
            {
                readers.extend(flow.data_readers(out));
            }
            k += 1;
        }
        let slices: Vec<String> = readers
            .iter()
            .map(|&r| flow.node(r))
            .filter(|n| matches!(n.op_type.as_str(), "Slice" | "Split"))
            .flat_map(|n| n.outputs.iter())
            .filter(|o| flow.data_readers(o).iter().any(|&q| to_out[q]))
            .cloned()
            .collect();
        match slices.as_slice() {
            [one] => Ok(one.clone()),
            _ => Err(StructureError::DualStreamUnsupported(format!(
                "after the last single block, the joint stream '{x_out}' reaches the output through {} slices, not one slice of the image tokens",
                slices.len()
            ))),
        }
    }

    /// The sub-layers of a group of residual adds (a block's, on its image or joint stream).
    fn sublayers(
        &self,
        residuals: &[Residual],
        group: &[usize],
        text_start: &str,
        text_desc: &[bool],
    ) -> Vec<Sublayer> {
        let n = self.flow.len();
        let all = vec![true; n];
        group
            .iter()
            .map(|&r| {
                let add = &residuals[r];
                let kind = self.sublayer_kind(&add.branch, &all);
                let joint = kind != SublayerKind::FeedForward
                    && self.reads_stream(add, text_start, text_desc);
                Sublayer {
                    input: add.skip.clone(),
                    output: add.out.clone(),
                    kind: if joint {
                        SublayerKind::JointAttention
                    } else {
                        kind
                    },
                    core_nodes: add.branch.len(),
                }
            })
            .collect()
    }

    /// Step 4 for joint stacks: each block's core is every node on a data path from the stream
    /// tensors it reads to those it writes. Every node between the first block's streams and the
    /// output must be in one core or after the stack; returns the nodes after it.
    fn assign_cores(
        &self,
        plans: &mut [BlockPlan],
        stack_output: &str,
    ) -> Result<Vec<usize>, StructureError> {
        let flow = &self.flow;
        let n = flow.len();
        let values = |plan: &BlockPlan, outputs: bool| -> Vec<String> {
            let (a, b) = if outputs {
                (&plan.output, &plan.text_output)
            } else {
                (&plan.input, &plan.text_input)
            };
            std::iter::once(a.clone()).chain(b.clone()).collect()
        };
        let to_out = self.reaching_output();
        let mut owner: Vec<Option<usize>> = vec![None; n];
        for (l, plan) in plans.iter_mut().enumerate() {
            let ins = values(plan, false);
            let outs = values(plan, true);
            let from: Vec<&str> = ins.iter().map(String::as_str).collect();
            let after_in = flow.data_descendants(&from);
            let in_producers: Vec<usize> = ins.iter().filter_map(|v| flow.producer(v)).collect();
            let before_in = flow.data_ancestors(&in_producers);
            let out_producers: Vec<usize> = outs.iter().filter_map(|v| flow.producer(v)).collect();
            let to_outs = flow.data_ancestors(&out_producers);
            for p in 0..n {
                if after_in[p] && to_outs[p] && !before_in[p] {
                    if let Some(other) = owner[p] {
                        return Err(StructureError::DualStreamUnsupported(format!(
                            "node '{}' lies between the streams of block {other} and of block {l}: a data path bypasses a block boundary",
                            flow.node(p).name
                        )));
                    }
                    owner[p] = Some(l);
                    plan.core.push(p);
                }
            }
        }
        let after_stack = flow.data_descendants(&[stack_output]);
        let final_core: Vec<usize> = (0..n).filter(|&p| after_stack[p] && to_out[p]).collect();
        let entries: Vec<String> = values(&plans[0], false);
        let from: Vec<&str> = entries.iter().map(String::as_str).collect();
        let inside = flow.data_descendants(&from);
        let in_final: HashSet<usize> = final_core.iter().copied().collect();
        if let Some(p) =
            (0..n).find(|&p| inside[p] && to_out[p] && owner[p].is_none() && !in_final.contains(&p))
        {
            return Err(StructureError::DualStreamUnsupported(format!(
                "node '{}' is on a data path from the streams to the output but in no block: a data path bypasses the block boundaries",
                flow.node(p).name
            )));
        }
        Ok(final_core)
    }
}

/// The stream tensors the single blocks read: entry j is what single block j reads (image or
/// joint stream, text stream when separate), the last one the image after them.
struct SingleLinks {
    entries: Vec<(String, Option<String>)>,
    image_first: bool,
    joined_once: bool,
}
