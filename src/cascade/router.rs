//! The heuristic router: a pure, allocation-light decision of which [`Route`] answers a message.
//!
//! Precedence (each decision records who chose it as [`RouterSource`]):
//!
//! 1. **forced**: a leading `!web`, `!think`, `!fast` or `!direct` (any case, followed by
//!    whitespace or the end) picks `web_then_grok`, `reason_then_grok`, `trivial_direct` or
//!    `grok_direct`; the prefix is removed from [`Decision::text`]. Per-room overrides are the
//!    caller's job.
//! 2. **heuristic**: deterministic rules on the message text (lowercased, whitespace-insensitive):
//!    * `trivial:*`: the *whole* message is greetings, thanks, acknowledgements or farewells
//!      (several languages, plus addressee fillers such as "there", "everyone", "grok", and
//!      emoji), at most 6 words and 40 characters, with no `?`, digit, URL or code symbol. This
//!      class is deliberately narrow: a real question sent to the cheap path is the costly
//!      mistake.
//!    * `web:*`: URLs and domains, explicit asks to search or cite, X/Twitter asks, temporal words,
//!      a year at or after the model's cutoff, fast-changing topics (weather, prices, scores,
//!      elections, release dates, exchange rates, "who won", outages). Generic words ("what is",
//!      "explain", "best") are never cues.
//!    * `reason:*`: arithmetic, maths words and notation, LaTeX, code fences, code, stack traces
//!      and compiler errors, asks to write or debug code, step by step, comparisons and
//!      trade-offs, several questions, long input.
//!
//!    Every rule is *strong* (weight 1) or *weak* (weight 1/2, a hint). A class fires when its
//!    weight reaches 1: one strong cue, or weak cues from two different rules. When web and
//!    reasoning both fire, web wins, except that web reached only through weak hints never
//!    overrides a strong reasoning cue. A fenced code block is itself a strong reasoning cue and
//!    its contents are not scanned (a URL or a date in a pasted `Cargo.toml` is not a request to
//!    browse); the prose around it is.
//! 3. **classifier**: not decided here. [`Decision::ambiguous`] is set when no strong cue matched
//!    but a weak one did; the caller may then ask a classifier model.
//! 4. **default**: no cue at all, or only hints below the threshold: `grok_direct`.
//!
//! # Confidence
//!
//! | decision | confidence |
//! | --- | --- |
//! | forced prefix | 1.0 |
//! | trivial (whole message matched) | 0.9 |
//! | web/reasoning with two or more strong cues of the winning class | 0.95 |
//! | web/reasoning with one strong cue | 0.85 |
//! | web/reasoning from weak hints only (`ambiguous`) | 0.6 |
//! | web and reasoning both fired (web won) | the above minus 0.1 |
//! | default, no cue | 0.5 |
//! | default with hints below the threshold (`ambiguous`) | 0.4 |
//!
//! # Cost
//!
//! The cue patterns are written for [`normalise`]d text but compiled whitespace-tolerant (see
//! `flex`), so a long message is never normalised: it is ASCII-lowercased in one SIMD-friendly
//! copy (the only sizeable allocation) and scanned by one pass of a precompiled byte-level
//! [`RegexSet`] (Unicode off: ASCII `\b`/`\w` keep it on the lazy DFA for any input). Years,
//! several questions and denied look-alike domains are gated by probe patterns in that same
//! pass, then checked with memchr-driven scans. Only messages short enough to be small talk
//! are fully normalised. A message that is already long input (so `reason:long_input` fixes
//! reasoning) is scanned whole for web cues but only in its first KiB for other reasoning
//! cues, which are then reported for the log only. See `benches/router.rs` for numbers.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::LazyLock;

use regex::bytes::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};

use super::{Route, RouterSource};

/// Router settings from config.
#[derive(Debug, Clone)]
pub struct RouterOptions {
    /// A year `>=` this in the message is "fresh" and asks for the web (default 2025).
    pub cutoff_year: i32,
    /// Messages longer than this many characters (trimmed) count as long input, a reasoning cue
    /// (default 800).
    pub long_input_chars: usize,
}

impl Default for RouterOptions {
    fn default() -> Self {
        RouterOptions {
            cutoff_year: 2025,
            long_input_chars: 800,
        }
    }
}

/// One routing decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub route: Route,
    /// `Forced`, `Heuristic` or `Default` (never `Classifier`/`Degraded`: the caller sets those).
    pub source: RouterSource,
    /// In `[0, 1]`; see the module documentation for the scheme.
    pub confidence: f64,
    /// Stable ids of the rules that matched (see [`RULE_IDS`]), in table order.
    pub rules: Vec<&'static str>,
    /// The message with a forced prefix removed (original case, trimmed); what the model sees.
    pub text: String,
    /// True when only weak cues matched and a classifier could help.
    pub ambiguous: bool,
}

/// Confidence of a forced decision.
pub const CONF_FORCED: f64 = 1.0;
/// Confidence of a whole-message trivial match.
pub const CONF_TRIVIAL: f64 = 0.9;
/// Confidence with two or more strong cues of the winning class.
pub const CONF_STRONG_MANY: f64 = 0.95;
/// Confidence with one strong cue of the winning class.
pub const CONF_STRONG_ONE: f64 = 0.85;
/// Confidence when the class fired from weak hints only.
pub const CONF_WEAK: f64 = 0.6;
/// Subtracted when web and reasoning both fired and web won.
pub const CONF_CONFLICT_PENALTY: f64 = 0.1;
/// Confidence of `grok_direct` with no cue.
pub const CONF_DEFAULT: f64 = 0.5;
/// Confidence of `grok_direct` when hints matched but stayed below the threshold.
pub const CONF_DEFAULT_HINTED: f64 = 0.4;

/// Most words a trivial message may have.
const TRIVIAL_MAX_WORDS: usize = 6;
/// Most characters a trivial message may have.
const TRIVIAL_MAX_CHARS: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Web,
    Reason,
}

/// A heuristic rule: its stable id, class and strength.
struct Rule {
    id: &'static str,
    class: Class,
    strong: bool,
}

const fn rule(id: &'static str, class: Class, strong: bool) -> Rule {
    Rule { id, class, strong }
}

/// Heuristic web/reasoning rules, in the order ids are reported.
const RULES: &[Rule] = &[
    rule("web:url", Class::Web, true),
    rule("web:search", Class::Web, true),
    rule("web:social", Class::Web, true),
    rule("web:temporal", Class::Web, true),
    rule("web:year", Class::Web, true),
    rule("web:fresh_topic", Class::Web, true),
    rule("web:temporal_hint", Class::Web, false),
    rule("web:topic_hint", Class::Web, false),
    rule("reason:code_fence", Class::Reason, true),
    rule("reason:stack_trace", Class::Reason, true),
    rule("reason:code", Class::Reason, true),
    rule("reason:code_task", Class::Reason, true),
    rule("reason:arithmetic", Class::Reason, true),
    rule("reason:math", Class::Reason, true),
    rule("reason:latex", Class::Reason, true),
    rule("reason:step_by_step", Class::Reason, true),
    rule("reason:compare", Class::Reason, true),
    rule("reason:multi_question", Class::Reason, true),
    rule("reason:long_input", Class::Reason, true),
    rule("reason:code_hint", Class::Reason, false),
    rule("reason:math_hint", Class::Reason, false),
    rule("reason:compare_hint", Class::Reason, false),
    rule("reason:planning_hint", Class::Reason, false),
];

const N_RULES: usize = RULES.len();

/// Every rule id the router can report: forced, trivial, then the heuristic rules.
pub const RULE_IDS: &[&str] = &[
    "forced:web",
    "forced:think",
    "forced:fast",
    "forced:direct",
    "trivial:greeting",
    "trivial:thanks",
    "trivial:ack",
    "trivial:farewell",
    "web:url",
    "web:search",
    "web:social",
    "web:temporal",
    "web:year",
    "web:fresh_topic",
    "web:temporal_hint",
    "web:topic_hint",
    "reason:code_fence",
    "reason:stack_trace",
    "reason:code",
    "reason:code_task",
    "reason:arithmetic",
    "reason:math",
    "reason:latex",
    "reason:step_by_step",
    "reason:compare",
    "reason:multi_question",
    "reason:long_input",
    "reason:code_hint",
    "reason:math_hint",
    "reason:compare_hint",
    "reason:planning_hint",
];

fn slot(id: &str) -> usize {
    RULES
        .iter()
        .position(|r| r.id == id)
        .unwrap_or_else(|| panic!("unknown router rule {id}"))
}

/// Patterns per rule id, written for normalised text (lowercase, single spaces, `'`) and compiled
/// through [`flex`] into one byte-level, ASCII-mode [`RegexSet`]: `\b`, `\w`, `\d` are ASCII;
/// non-ASCII literals are written inside `(?u:...)`. `probe:*` entries are not rules: they gate
/// the computed rules.
const CUES: &[(&str, &str)] = &[
    // ---- web ----
    ("web:url", r"https?://|\bwww\.[a-z0-9-]"),
    // A bare domain; when a DOMAIN_DENY name is present, hits are checked one by one.
    ("web:url", DOMAIN_PATTERN),
    (
        "web:search",
        r"^(?:(?:please|pls|hey|ok|okay|grok),? )?(?:(?:can|could|would|will) (?:you|u) )?(?:please )?(?:do a |run a |quick |quickly )?(?:web |google |internet |online )?search\b",
    ),
    (
        "web:search",
        r"\b(?:search|check|look) (?:on |up |through )?(?:the )?(?:web|online|internet|news|google)\b",
    ),
    (
        "web:search",
        r"\b(?:can|could|would|will) (?:you|u) (?:please )?(?:search|google|look up|browse|find (?:me )?(?:sources|articles|links|info))\b",
    ),
    (
        "web:search",
        r"\blook (?:it |this |that |them |these |those )?up\b|\bgoogle (?:it|this|that|for)\b|^google\b|\bbrowse (?:the )?(?:web|internet)\b|\bfact[- ]?check\b",
    ),
    (
        "web:search",
        r"\b(?:find|give|show|get|list|provide|include|with|add|cite) (?:me |us )?(?:some |the |a few |relevant |recent |latest |your |good |credible )?(?:sources|citations|references|links|articles|papers|studies)\b|\bcite\b|\bciting\b|\bcitations?\b",
    ),
    (
        "web:social",
        r"\btrending\b|\btweets\b|\btweeted\b|\bretweet|\bon twitter\b|\b(?:posted|said|saying|tweeting|viral|posts?|people) on x\b|\b(?:x|twitter) (?:posts|thread|trends)\b",
    ),
    (
        "web:temporal",
        r"\b(?:today|tonight|yesterday|tomorrow|right now|currently|latest|newest|breaking|these days|nowadays|at the moment|upcoming|up[- ]to[- ]date|real[- ]?time)\b",
    ),
    (
        "web:temporal",
        r"\bas of (?:now|today|this|right now)\b|\bthis (?:week|month|year|weekend|season|morning|afternoon|evening|quarter)\b|\blast (?:night|week|weekend|month)\b|\bso far (?:this|in)\b|\bjust (?:been )?(?:released|announced|launched|happened|dropped|came out)\b|\blive (?:score|scores|stream|results|updates|coverage|feed|price|prices)\b|\b(?:recent|new|newest) (?:developments?|news|events|advances|research|papers|articles|studies|updates|changes|releases?|results|findings|breakthroughs|trends|announcements?)\b",
    ),
    (
        "web:fresh_topic",
        r"\bweather\b|\bforecast (?:for|in|today|tomorrow|this)\b|\bnews\b|\bheadlines?\b",
    ),
    (
        "web:fresh_topic",
        r"\bexchange rates?\b|\bconversion rate\b|\b(?:stock|share) prices?\b|\bmarket cap\b|\binterest rates?\b|\binflation rate\b|\bmortgage rates?\b|\b(?:gas|fuel|petrol) prices?\b|\bprices? of\b|\b(?:bitcoin|btc|ethereum|eth|crypto|gold|silver|oil|stock|share|ticker) (?:price|prices|value|rate)\b",
    ),
    (
        "web:fresh_topic",
        r"\b(?:usd|eur|gbp|jpy|chf|cny|cad|aud|inr|btc|eth|dollars?|euros?|pounds?|yen) (?:to|in|into|vs) (?:usd|eur|gbp|jpy|chf|cny|cad|aud|inr|btc|eth|dollars?|euros?|yen)\b",
    ),
    (
        "web:fresh_topic",
        r"\bwho(?: is|'s)? (?:won|winning|will win|leading|leads)\b|\belection results?\b|\b(?:opinion |exit )?polls\b|\bpolling (?:numbers|data)\b|\bapproval rating\b",
    ),
    (
        "web:fresh_topic",
        r"\bstandings\b|\bfixtures\b|\bleague table\b|\bbox office\b|\bfinal score\b|\bscore of the\b|\bwhat'?s the score\b|\bresults? of the (?:match|game|race|election|vote|draw)\b|\blottery (?:numbers|results)\b|\b(?:nba|nfl|nhl|mlb|mls|premier league|la liga|bundesliga|serie a|ligue 1|champions league|europa league|world cup|f1|formula 1|ufc|atp|wta|ipl) (?:scores?|results?|standings|table|schedule|fixtures|playoffs?|draft|trades?|news|odds|rankings?)\b",
    ),
    (
        "web:fresh_topic",
        r"\b(?:release|launch|air|premiere) date\b|\bwhen (?:is|does|will) (?:[a-z0-9.'-]+ ){1,6}(?:come out|be released|release|launch|premiere|air)\b|\b(?:released|out|available|announced|launched) yet\b|\bwhen(?: is|'s| does| will)? the next\b|\bnext (?:launch|match|game|election|release|episode|season|event|race|grand prix|fight|eclipse|keynote|iphone|super bowl|world cup)\b",
    ),
    (
        "web:fresh_topic",
        r"\boutages?\b|\bdowntime\b|\bstatus page\b|\bservice status\b|\bis (?:the )?[a-z0-9.-]+(?: [a-z0-9.-]+)? (?:down|offline|having (?:issues|problems))(?: (?:right now|today|again|for everyone))?(?:$|[?!.])",
    ),
    (
        "web:fresh_topic",
        r"\b(?:ceo|cto|cfo|chairman|head coach) of\b|\bwho is (?:the )?(?:current )?(?:president|prime minister|chancellor|ceo|king|pope|mayor|governor|champion|coach)\b|\bflight status\b|\btraffic (?:on|in|at|near)\b|\bwhat(?:'s| is) new (?:in|with|about|for)\b|\bany (?:updates?|news|word) (?:on|about|regarding|from)\b",
    ),
    (
        "web:temporal_hint",
        r"\b(?:current|recent|recently|lately|anymore|still|next|live)\b",
    ),
    (
        "web:topic_hint",
        r"\b(?:score|scores|match|tournament|championship|playoffs?|world cup|super bowl|olympics|grand prix|stocks?|stock market|crypto|cryptocurrency|bitcoin|btc|ethereum|nasdaq|dow jones|forex|elections?|voting|president of|prime minister of|chancellor of|leader of|owner of|who owns|who runs|released|release|version|changelog|release notes|launch|launched|came out|come out|temperature|rain|raining|snow|snowing|traffic|price|prices|pricing|happened|happening|announced|announcement|earthquake|hurricane|wildfire|ceasefire|acquisition|acquired|merger|ipo|lawsuit|verdict|rumou?rs?|season|episode)\b",
    ),
    // ---- reasoning ----
    ("reason:code_fence", r"```|~~~"),
    // ---- probes: cheap gates for the computed rules ----
    (PROBE_YEAR, r"\b20\d\d\b"),
    (PROBE_QUESTIONS, r"(?:\?|(?u:？))(?s:.)*(?:\?|(?u:？))"),
    (PROBE_DENIED_DOMAIN, r"\b(?:asp|ado|vb)\.net\b"),
    (
        "reason:stack_trace",
        r"\btraceback \(most recent call last\)|\bpanicked at\b|\bthread '[\w-]+' panicked|\berror\[e\d{3,4}\]|\bexception in thread\b|\b\w{2,}(?:error|exception)\b|\bsegmentation fault\b|\bsegfault|\bcore dumped\b|\bstack ?trace\b|\bbacktrace\b",
    ),
    (
        "reason:stack_trace",
        r#"\bat [\w$.]+\([\w]+\.(?:java|kt|scala|js|ts|cs):\d+|\bfile "[^"]+", line \d+|\bline \d+, in\b|\bundefined reference to\b|\bcannot find symbol\b|\bundefined is not a function\b|\bcannot read propert(?:y|ies) of (?:undefined|null)\b|\breturned non-zero exit status\b|\bexit (?:code|status) -?\d+|\bunhandled (?:promise )?rejection\b|\bfatal error:|\bnpm err!|\berror: (?:expected|cannot|could not|failed|unresolved|mismatched|use of|no method|the trait|aborting|linking)"#,
    ),
    (
        "reason:code",
        r"#include\b|\bfn [a-z_]\w*\s*[(<]|\bdef [a-z_]\w*\s*\(|\bclass [a-z_]\w*\s*(?:[:({]|extends\b|implements\b)|\bpub (?:fn|struct|enum|mod|trait|use)\b|\blet mut\b|\bimpl(?:<[^>]*>)? [a-z_]\w* (?:for\b|\{)",
    ),
    (
        "reason:code",
        r#"\bconsole\.log\(|\bprintln!|\bprint\(|\bprintf\(|\bsystem\.out\.print|\busing namespace\b|\b(?:const|let|var) [a-z_$][\w$]* ?= ?|\bfunction\s*[a-z_$]*\s*\([^)]*\)\s*\{|\)\s*\{|\}\s*else\b|=>\s*\{|\w\([^()]*\);|\w+::\w+"#,
    ),
    (
        "reason:code",
        r#"\bselect (?:\*|distinct |count\(|[a-z_][\w.]*(?:, ?[a-z_][\w.]*)*) from\b|\binsert into\b|\bcreate table\b|\bdelete from\b|\bupdate [a-z_]+ set\b|\bimport [a-z_][\w.]*(?: as [a-z_]+)?;|\bfrom [a-z_][\w.]* import\b|\bimport \{|\brequire\(['"]|\buse [a-z_]+::|</?(?:div|span|html|body|script|template|button|input)\b|\$ (?:cargo|npm|pip|git|docker|kubectl|python3?|make|sudo|go) |\b[a-z_]\w*\.[a-z_]\w*\([^()]*\)"#,
    ),
    (
        "reason:code_task",
        r"\b(?:write|create|generate|give me|make|build|implement|code|show me|design)\s+(?:me\s+)?(?:a |an |some |the |this |that |my )?(?:[a-z0-9+#-]+ ){0,3}(?:function|func|method|class|script|program|query|regex|regexp|regular expression|unit tests?|test suite|tests|parser|algorithm|api|endpoint|cli|module|library|crate|package|struct|macro|snippet|code|bash|shell script|sql|dockerfile|makefile|github action|workflow|server|backend|frontend|component|migration|schema|database|data model)\b",
    ),
    (
        "reason:code_task",
        r"\bimplement(?:ing|ation of)?\b|\b(?:debug|debugging|refactor|refactoring)\b|\bfix (?:this|my|the) (?:code|bug|function|error|test|query|script|program|build|crash|compile error|regex)\b|\bcode review\b|\breview (?:this|my) (?:code|pr|pull request|diff|patch)\b|\bunit tests?\b|\btest cases? for\b|\bregex(?:es|p)?\b|\bregular expressions?\b",
    ),
    (
        "reason:code_task",
        r"\bwhy (?:does|is|do|doesn'?t|isn'?t|won'?t|can'?t) (?:this|my|the) (?:code|function|program|script|query|test|loop|build|regex|compiler|borrow checker|type checker|linter)\b|\bwhy (?:does|is|do) (?:this|it|my \w+) (?:panic|crash|segfault|throw|fail to compile|not compile|leak memory|deadlock|hang|overflow)\b|\b(?:doesn'?t|does not|won'?t|will not|fails? to|failed to) compile\b|\bcompil(?:e|er|ation) (?:error|errors|fails?|failed)\b|\bborrow checker\b|\btype error\b|\blinker error\b|\b(?:optimi[sz]e|speed up|parallelize|vectorize) (?:this|my|the) (?:code|function|query|loop|algorithm|program)\b",
    ),
    (
        "reason:arithmetic",
        r"\d\s*(?:[+*^=%]|\*\*|(?u:×|÷|−))\s*\(?\s*-?\d|\d\s+[-/]\s+\(?-?\d|\d\s*\)\s*(?:[-+*/^]|(?u:×|÷))\s*\(?\s*\d|\bwhat(?:'s| is) -?\d+(?:\.\d+)? ?[-/] ?\d",
    ),
    (
        "reason:arithmetic",
        r"\b\d+(?:\.\d+)?\s*(?:times|plus|minus|divided by|multiplied by|to the power of|raised to|mod|modulo)\s+\(?-?\d|\b\d+(?:\.\d+)? (?:squared|cubed|factorial)\b|\b(?:square|cube) root of \d|\bsqrt ?\(? ?\d|\b\d+(?:\.\d+)? ?(?:%|percent) of \d|\b(?:sum|product|average|mean|median|factorial|square root|cube root|gcd|lcm) of (?:the )?(?:numbers |first )?-?\d",
    ),
    (
        "reason:math",
        r"\b(?:solve|prove|proof|derive|derivation|derivative|derivatives|integral|integrals|antiderivative|differentiate|equations?|inequality|theorem|lemma|probability|expected value|expected number of|variance of|standard deviation of|how many ways|number of ways|how many combinations|permutations of|combinatorics|big-?o|time complexity|space complexity|asymptotic|eigenvalues?|eigenvectors?|determinant|matrix multiplication|factori[sz]e|prime factori[sz]ation|greatest common divisor|least common multiple|gcd|lcm|logarithm|quadratic|polynomial|modular arithmetic|limit of|geometric series|arithmetic series)\b",
    ),
    (
        "reason:math",
        r"\bintegrat(?:e|ing)\s+(?:the\s+)?(?:[a-z]?\(|[a-z0-9]+\s*[\^*/]|x\b|sin|cos|tan|e\^|ln|log|sqrt|1\s*/)|\bsimplify (?:the |this )?(?:expression|equation|fraction)\b|\bis \d+ (?:a )?prime\b|\b\d*[a-z] ?\^ ?[\d(a-z]|\b\d+[a-z] ?[-+] ?\d+ ?=|\bf\([a-z]\) ?=|\bd[a-z]/d[a-z]\b|\bln\(|\blog_?\d*\(",
    ),
    ("reason:math", r"(?u:∫|∑|∏|√|∂|∇|≤|≥|≠|≈|∞|∀|∃|∈)"),
    (
        "reason:latex",
        r"\\(?:frac|dfrac|tfrac|sum|int|iint|oint|prod|lim|sqrt|partial|nabla|infty|begin\{|mathbb|mathcal|mathrm|cdot|times|leq|geq|neq|approx|alpha|beta|gamma|delta|epsilon|theta|lambda|sigma|omega|pi|binom|vec|hat|overline|left|right)\b|\$\$|\\\[|\\\(",
    ),
    (
        "reason:step_by_step",
        r"\bstep[- ]by[- ]step\b|\bwalk me through\b|\bshow (?:your|the|all) (?:work|steps)\b|\bthink (?:it )?(?:through|carefully|hard)\b|\breason (?:through|about it|carefully)\b|\bexplain your reasoning\b|\bchain of thought\b",
    ),
    (
        "reason:compare",
        r"\bcompare\b|\bcomparing\b|\bcomparison (?:of|between)\b|\bpros and cons\b|\bpros/cons\b|\btrade[- ]?offs?\b|\badvantages and disadvantages\b|\bstrengths and weaknesses\b|\bweigh (?:the )?(?:options|pros)\b",
    ),
    (
        "reason:code_hint",
        r"\b(?:rust|python|javascript|typescript|golang|java|kotlin|swift|haskell|ocaml|scala|ruby|php|perl|bash|powershell|sql|html|css|react|node\.?js|c\+\+|c#|algorithm|data structure|linked list|binary (?:search|tree)|hash ?map|recursion|recursive|compiler|async|mutex|pointer|api|bug|null)\b|==|!=|&&|\|\||->",
    ),
    (
        "reason:math_hint",
        r"\b(?:calculate|compute|how much is|how many|average of|mean of|median of|sum of|estimate|formula|percentage|ratio|odds|statistics|math|maths|mathematical)\b|(?:^|[^/\d.])\d+/\d+(?:$|[^/\d])",
    ),
    (
        "reason:compare_hint",
        r"\bvs\b|\bversus\b|\bwhich (?:one )?is better\b|\bdifferences? between\b|\bshould i (?:use|choose|pick|go with)\b|\bbetter than\b",
    ),
    (
        "reason:planning_hint",
        r"\b(?:design|architect|architecture|plan|strategy|roadmap|optimi[sz]e|analy[sz]e|analysis|evaluate|critique)\b",
    ),
];

/// A bare domain name (not an e-mail address). Kept separate so hits can be checked against
/// [`DOMAIN_DENY`].
const DOMAIN_PATTERN: &str = r"(?:^|[^@\w.-])[a-z0-9][a-z0-9-]*(?:\.[a-z0-9-]+)*\.(?:com|org|net|io|ai|dev|gov|edu|co|news|info|tv|gg|uk|de|fr|eu|app|xyz)\b";

/// Dotted names that look like domains but are technologies.
/// Keep in step with the `PROBE_DENIED_DOMAIN` pattern.
const DOMAIN_DENY: &[&str] = &["asp.net", "ado.net", "vb.net"];

/// Probe ids: patterns that only gate a computed rule.
const PROBE_YEAR: &str = "probe:year";
const PROBE_QUESTIONS: &str = "probe:questions";
const PROBE_DENIED_DOMAIN: &str = "probe:denied_domain";

/// What a set pattern feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Rule(usize),
    /// A four-digit number starting with 20 (gates [`has_fresh_year`]).
    ProbeYear,
    /// At least two question marks (gates [`count_questions`]).
    ProbeQuestions,
    /// A name in [`DOMAIN_DENY`]: bare-domain hits must then be checked one by one.
    ProbeDeniedDomain,
}

/// One compiled [`RegexSet`] over a subset of [`CUES`].
struct CueSet {
    set: RegexSet,
    /// Pattern index -> what it feeds.
    targets: Vec<Target>,
    /// Pattern index of [`DOMAIN_PATTERN`], when the set has it.
    domain_index: Option<usize>,
}

impl CueSet {
    fn new(keep: impl Fn(&str) -> bool) -> CueSet {
        let cues: Vec<&(&str, &str)> = CUES.iter().filter(|(id, _)| keep(id)).collect();
        let patterns: Vec<String> = cues.iter().map(|(_, p)| flex(p)).collect();
        let set = RegexSetBuilder::new(&patterns)
            .unicode(false)
            .size_limit(64 << 20)
            .dfa_size_limit(32 << 20)
            .build()
            .expect("router cue patterns compile");
        let targets = cues
            .iter()
            .map(|(id, _)| match *id {
                PROBE_YEAR => Target::ProbeYear,
                PROBE_QUESTIONS => Target::ProbeQuestions,
                PROBE_DENIED_DOMAIN => Target::ProbeDeniedDomain,
                id => Target::Rule(slot(id)),
            })
            .collect();
        let domain_index = cues.iter().position(|(_, p)| *p == DOMAIN_PATTERN);
        CueSet {
            set,
            targets,
            domain_index,
        }
    }
}

struct Matcher {
    /// Every cue and probe: one pass for messages that are not long input.
    all: CueSet,
    /// Web cues and probes: the whole of a long message.
    web: CueSet,
    /// Reasoning cues: the head of a long message (for the rule list only).
    reason: CueSet,
    domain: Regex,
    /// Slots of the rules the scan sets itself.
    fence: usize,
    year: usize,
    multi_question: usize,
    long_input: usize,
}

/// Compile the cue sets once. Unicode mode is off, so `\b`, `\w` and `\d` are ASCII and the
/// sets stay on the lazy DFA even for non-ASCII input. Patterns go through [`flex`].
fn compile_set() -> Matcher {
    let domain = RegexBuilder::new(&flex(DOMAIN_PATTERN))
        .unicode(false)
        .build()
        .expect("domain pattern compiles");
    Matcher {
        all: CueSet::new(|_| true),
        web: CueSet::new(|id| !id.starts_with("reason:")),
        reason: CueSet::new(|id| id.starts_with("reason:")),
        domain,
        fence: slot("reason:code_fence"),
        year: slot("web:year"),
        multi_question: slot("reason:multi_question"),
        long_input: slot("reason:long_input"),
    }
}

static MATCHER: LazyLock<Matcher> = LazyLock::new(compile_set);

/// Patterns are written for normalised text (single spaces, `'`), but the scan runs on the
/// trimmed message with only ASCII lowercased, which is far cheaper than normalising a long
/// paste. So outside character classes a literal space becomes `\s+` (` ?`/` *` become `\s*`)
/// and `'` also accepts the typographic `’`.
fn flex(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len() * 2);
    let mut chars = pattern.chars().peekable();
    let mut in_class = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                out.push(c);
                if let Some(next) = chars.next() {
                    out.push(next);
                }
            }
            '[' if !in_class => {
                in_class = true;
                out.push(c);
            }
            ']' if in_class => {
                in_class = false;
                out.push(c);
            }
            ' ' if !in_class => match chars.peek() {
                Some('?' | '*') => {
                    chars.next();
                    out.push_str(r"\s*");
                }
                Some('+') => {
                    chars.next();
                    out.push_str(r"\s+");
                }
                _ => out.push_str(r"\s+"),
            },
            '\'' if !in_class => out.push_str("(?:'|(?u:\u{2019}))"),
            _ => out.push(c),
        }
    }
    out
}

/// Lowercase, trim and collapse every run of whitespace (including newlines and Unicode
/// spaces) into one space; typographic apostrophes (`’`, `‘`) become `'`. The caller strips
/// mentions and the reply fallback before this.
pub fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    if text.is_ascii() {
        for word in text.split_ascii_whitespace() {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(word);
        }
        out.make_ascii_lowercase();
        return out;
    }
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        if word.is_ascii() {
            out.push_str(word);
            continue;
        }
        for c in word.chars() {
            match c {
                '\u{2018}' | '\u{2019}' => out.push('\''),
                c if c.is_ascii() => out.push(c),
                c => out.extend(c.to_lowercase()),
            }
        }
    }
    out.make_ascii_lowercase();
    out
}

/// Route a message. Pure and deterministic; see the module documentation.
pub fn decide(text: &str, options: &RouterOptions) -> Decision {
    let trimmed = text.trim();
    if let Some(decision) = forced(trimmed) {
        return decision;
    }
    if trimmed.is_empty() {
        return Decision {
            route: Route::GrokDirect,
            source: RouterSource::Default,
            confidence: CONF_DEFAULT,
            rules: Vec::new(),
            text: String::new(),
            ambiguous: false,
        };
    }
    if let Some(rules) = trivial_candidate(trimmed).and_then(|n| trivial(&n)) {
        return Decision {
            route: Route::TrivialDirect,
            source: RouterSource::Heuristic,
            confidence: CONF_TRIVIAL,
            rules,
            text: trimmed.to_string(),
            ambiguous: false,
        };
    }

    let limit = options.long_input_chars;
    let long = trimmed.len() > limit && trimmed.chars().count() > limit;
    let mut hits = scan(&trimmed.to_ascii_lowercase(), long, options);
    if long {
        hits[MATCHER.long_input] = true;
    }
    let mut web = Score::default();
    let mut reason = Score::default();
    for (i, r) in RULES.iter().enumerate() {
        if hits[i] {
            match r.class {
                Class::Web => web.add(r.strong),
                Class::Reason => reason.add(r.strong),
            }
        }
    }
    let rules: Vec<&'static str> = RULES
        .iter()
        .zip(hits.iter())
        .filter(|(_, hit)| **hit)
        .map(|(r, _)| r.id)
        .collect();

    // Web wins over reasoning, unless web has only hints and reasoning has a strong cue.
    let web_wins = web.fires() && (web.strong > 0 || reason.strong == 0);
    let (route, winner, conflict) = if web_wins {
        (Route::WebThenGrok, Some(web), reason.fires())
    } else if reason.fires() {
        (Route::ReasonThenGrok, Some(reason), false)
    } else {
        (Route::GrokDirect, None, false)
    };
    let (source, confidence, ambiguous) = match winner {
        Some(score) => {
            let base = match score.strong {
                0 => CONF_WEAK,
                1 => CONF_STRONG_ONE,
                _ => CONF_STRONG_MANY,
            };
            let penalty = if conflict { CONF_CONFLICT_PENALTY } else { 0.0 };
            (
                RouterSource::Heuristic,
                (base - penalty).clamp(0.0, 1.0),
                score.strong == 0,
            )
        }
        None if rules.is_empty() => (RouterSource::Default, CONF_DEFAULT, false),
        None => (RouterSource::Default, CONF_DEFAULT_HINTED, true),
    };
    Decision {
        route,
        source,
        confidence,
        rules,
        text: trimmed.to_string(),
        ambiguous,
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Score {
    strong: u32,
    weak: u32,
}

impl Score {
    fn add(&mut self, strong: bool) {
        if strong {
            self.strong += 1;
        } else {
            self.weak += 1;
        }
    }
    /// Weight >= 1: one strong cue, or two weak ones.
    fn fires(&self) -> bool {
        self.strong >= 1 || self.weak >= 2
    }
}

/// A leading `!web`, `!think`, `!fast` or `!direct` (any case) followed by whitespace or the end.
fn forced(trimmed: &str) -> Option<Decision> {
    let rest = trimmed.strip_prefix('!')?;
    let end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
    let word = &rest[..end];
    let (route, rule) = if word.eq_ignore_ascii_case("web") {
        (Route::WebThenGrok, "forced:web")
    } else if word.eq_ignore_ascii_case("think") {
        (Route::ReasonThenGrok, "forced:think")
    } else if word.eq_ignore_ascii_case("fast") {
        (Route::TrivialDirect, "forced:fast")
    } else if word.eq_ignore_ascii_case("direct") {
        (Route::GrokDirect, "forced:direct")
    } else {
        return None;
    };
    Some(Decision {
        route,
        source: RouterSource::Forced,
        confidence: CONF_FORCED,
        rules: vec![rule],
        text: rest[end..].trim().to_string(),
        ambiguous: false,
    })
}

/// Flags from one pass of the set.
#[derive(Default)]
struct Probes {
    year: bool,
    questions: bool,
    denied_domain: bool,
}

/// Bytes of a long message the reasoning cues are looked for in.
const LONG_REASON_SCAN_BYTES: usize = 1024;

/// Run the cue sets and the computed rules over the ASCII-lowercased message; returns one flag
/// per [`RULES`] slot.
///
/// A fenced code block is a strong reasoning cue by itself, and a URL or a date inside pasted
/// code is not a request for the web, so when the text has a fence only the prose around the
/// fences is scanned (which also keeps large pastes cheap).
///
/// A `long` message already fires `reason:long_input`, so other reasoning cues cannot change
/// its route: the web cues are looked for in all of it, the reasoning cues (reported for the
/// log) only in its first [`LONG_REASON_SCAN_BYTES`]. Pasted code fires a reasoning pattern on
/// nearly every line, and skipping those match events keeps 4 KiB under the time budget.
fn scan(text: &str, long: bool, options: &RouterOptions) -> [bool; N_RULES] {
    let m = &*MATCHER;
    let mut hits = [false; N_RULES];
    // `contains(char)` is a memchr; the three-byte search runs only when it hits.
    let fenced = (text.contains('`') && text.contains("```"))
        || (text.contains('~') && text.contains("~~~"));
    let prose = if fenced {
        hits[m.fence] = true;
        Cow::Owned(strip_fences(text))
    } else {
        Cow::Borrowed(text)
    };
    let probes = if long && prose.len() > LONG_REASON_SCAN_BYTES {
        let mut head = LONG_REASON_SCAN_BYTES;
        while !prose.is_char_boundary(head) {
            head -= 1;
        }
        mark(m, &m.reason, prose[..head].as_bytes(), &mut hits);
        mark(m, &m.web, prose.as_bytes(), &mut hits)
    } else {
        mark(m, &m.all, prose.as_bytes(), &mut hits)
    };
    if probes.year && has_fresh_year(&prose, options.cutoff_year) {
        hits[m.year] = true;
    }
    if probes.questions && count_questions(&prose) >= 2 {
        hits[m.multi_question] = true;
    }
    hits
}

/// One pass of `cues` over `text`: sets rule flags and returns the probes.
fn mark(m: &Matcher, cues: &CueSet, text: &[u8], hits: &mut [bool; N_RULES]) -> Probes {
    let mut probes = Probes::default();
    let matches = cues.set.matches(text);
    for i in matches.iter() {
        match cues.targets[i] {
            Target::ProbeYear => probes.year = true,
            Target::ProbeQuestions => probes.questions = true,
            Target::ProbeDeniedDomain => probes.denied_domain = true,
            Target::Rule(_) => {}
        }
    }
    for i in matches.iter() {
        if let Target::Rule(s) = cues.targets[i] {
            // A bare-domain hit needs a second look only when a denied name is present.
            if cues.domain_index == Some(i) && probes.denied_domain && !has_domain(m, text) {
                continue;
            }
            hits[s] = true;
        }
    }
    probes
}

/// True when some bare-domain hit is not a technology name such as `asp.net`.
fn has_domain(m: &Matcher, text: &[u8]) -> bool {
    m.domain.find_iter(text).any(|hit| {
        let s = hit.as_bytes();
        let s = match s.first() {
            Some(c) if !c.is_ascii_alphanumeric() => &s[1..],
            _ => s,
        };
        !DOMAIN_DENY.iter().any(|d| d.as_bytes() == s)
    })
}

/// The text with fenced code blocks (``` or ~~~) removed; an unclosed fence runs to the end.
fn strip_fences(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let open = match (rest.find("```"), rest.find("~~~")) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => {
                out.push_str(rest);
                return out;
            }
        };
        let fence = &rest[open..open + 3];
        out.push_str(&rest[..open]);
        out.push(' ');
        let after = &rest[open + 3..];
        match after.find(fence) {
            Some(close) => rest = &after[close + 3..],
            None => return out,
        }
    }
}

/// A standalone four-digit year in `cutoff..=2099` that is not an operand of arithmetic.
fn has_fresh_year(text: &str, cutoff: i32) -> bool {
    let b = text.as_bytes();
    // Every candidate starts with "20": jump between '2's with memchr.
    text.match_indices('2').any(|(start, _)| {
        let end = start + 4;
        let Some(digits) = b.get(start..end) else {
            return false;
        };
        if digits[1] != b'0' || !digits[2].is_ascii_digit() || !digits[3].is_ascii_digit() {
            return false;
        }
        // Standalone: not glued to letters, digits, decimals or a currency sign ("v2026",
        // "12026", "2026.5", "$2030", "2026px").
        let prev = if start > 0 { b[start - 1] } else { b' ' };
        let next = b.get(end).copied().unwrap_or(b' ');
        if prev.is_ascii_alphanumeric()
            || prev == b'.'
            || prev == b'$'
            || next.is_ascii_alphanumeric()
            || (next == b'.' && b.get(end + 1).is_some_and(u8::is_ascii_digit))
        {
            return false;
        }
        let year = digits
            .iter()
            .fold(0i32, |acc, d| acc * 10 + i32::from(d - b'0'));
        (cutoff..=2099).contains(&year) && !is_operand(b, start, end)
    })
}

/// The number at `b[start..end]` is an operand: its nearest non-space neighbour is an operator,
/// or a minus set off by spaces ("2030 - 5"; "2025-2026" and "2026-01-15" are not).
fn is_operand(b: &[u8], start: usize, end: usize) -> bool {
    const OPS: &[u8] = b"+*/^=%";
    let before = b[..start].iter().rposition(|c| !c.is_ascii_whitespace());
    let after = b[end..]
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .map(|p| end + p);
    let spaced_minus = |at: usize| {
        b[at] == b'-'
            && at > 0
            && b[at - 1].is_ascii_whitespace()
            && b.get(at + 1).is_some_and(u8::is_ascii_whitespace)
    };
    before.is_some_and(|p| OPS.contains(&b[p]) || spaced_minus(p))
        || after.is_some_and(|p| OPS.contains(&b[p]) || spaced_minus(p))
}

/// Questions of at least two words (runs of `?` count once): the text before each question
/// mark, back to the previous one, must hold two words.
fn count_questions(text: &str) -> usize {
    let b = text.as_bytes();
    let mut marks: Vec<(usize, usize)> = text.match_indices('?').map(|(i, _)| (i, 1)).collect();
    if text.contains('？') {
        marks.extend(text.match_indices('？').map(|(i, q)| (i, q.len())));
        marks.sort_unstable();
    }
    let mut count = 0;
    let mut segment_start = 0;
    for (at, len) in marks {
        if has_two_words(&b[segment_start..at]) {
            count += 1;
        }
        segment_start = at + len;
    }
    count
}

/// At least two words, looking backwards from the end (so long segments stop early).
fn has_two_words(segment: &[u8]) -> bool {
    let mut words = 0;
    let mut in_word = false;
    for &c in segment.iter().rev() {
        let wordy = c.is_ascii_alphanumeric() || c >= 0x80 || c == b'\'';
        if wordy && !in_word {
            words += 1;
            if words == 2 {
                return true;
            }
        }
        in_word = wordy;
    }
    false
}

// ---------------------------------------------------------------------------------------------
// Trivial: the whole message is small talk.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Small {
    Greeting,
    Thanks,
    Ack,
    Farewell,
    Filler,
}

const GREETINGS: &[&str] = &[
    "hi",
    "hello",
    "hey",
    "heya",
    "hiya",
    "yo",
    "sup",
    "wassup",
    "whats up",
    "what's up",
    "howdy",
    "greetings",
    "gm",
    "good morning",
    "good afternoon",
    "good evening",
    "good day",
    "morning",
    "evening",
    "hello again",
    "how are you",
    "how are you doing",
    "how's it going",
    "hows it going",
    "how r u",
    "how are u",
    "hola",
    "buenos dias",
    "buenos días",
    "buenas",
    "buenas tardes",
    "buenas noches",
    "bonjour",
    "bonsoir",
    "salut",
    "coucou",
    "hallo",
    "guten morgen",
    "guten tag",
    "guten abend",
    "moin",
    "servus",
    "grüß gott",
    "ciao",
    "buongiorno",
    "buonasera",
    "olá",
    "ola",
    "oi",
    "bom dia",
    "boa tarde",
    "boa noite",
    "hej",
    "hei",
    "hoi",
    "namaste",
    "merhaba",
    "salam",
    "salaam",
    "shalom",
    "ahoj",
    "cześć",
    "czesc",
    "привет",
    "здравствуйте",
    "добрый день",
    "доброе утро",
    "добрый вечер",
    "こんにちは",
    "おはよう",
    "こんばんは",
    "你好",
    "您好",
    "안녕하세요",
    "안녕",
];

const THANKS: &[&str] = &[
    "thanks",
    "thank you",
    "thankyou",
    "thanx",
    "thnx",
    "thx",
    "ty",
    "tysm",
    "tyvm",
    "cheers",
    "much appreciated",
    "appreciated",
    "appreciate it",
    "i appreciate it",
    "many thanks",
    "thanks a lot",
    "thanks a bunch",
    "thanks a ton",
    "thanks so much",
    "thanks very much",
    "thanks much",
    "thank you so much",
    "thank you very much",
    "gracias",
    "muchas gracias",
    "merci",
    "merci beaucoup",
    "danke",
    "danke schön",
    "danke schon",
    "danke sehr",
    "vielen dank",
    "grazie",
    "grazie mille",
    "obrigado",
    "obrigada",
    "muito obrigado",
    "muito obrigada",
    "dank je",
    "dank je wel",
    "dank u",
    "bedankt",
    "tack",
    "takk",
    "tak",
    "dziękuję",
    "dzięki",
    "teşekkürler",
    "teşekkür ederim",
    "shukran",
    "kiitos",
    "спасибо",
    "большое спасибо",
    "спасибо большое",
    "огромное спасибо",
    "arigato",
    "arigatou",
    "ありがとう",
    "ありがとうございます",
    "谢谢",
    "多谢",
    "감사합니다",
    "고마워",
];

const ACKS: &[&str] = &[
    "ok",
    "okay",
    "okey",
    "oki",
    "okie",
    "k",
    "cool",
    "nice",
    "great",
    "awesome",
    "perfect",
    "excellent",
    "amazing",
    "wonderful",
    "fantastic",
    "brilliant",
    "neat",
    "sweet",
    "got it",
    "gotcha",
    "sounds good",
    "sounds great",
    "lol",
    "lmao",
    "lmfao",
    "rofl",
    "lel",
    "xd",
    "understood",
    "noted",
    "alright",
    "all right",
    "fine",
    "fair enough",
    "makes sense",
    "that makes sense",
    "i see",
    "good",
    "very good",
    "good job",
    "well done",
    "nice one",
    "wow",
    "oh",
    "ah",
    "hm",
    "mhm",
    "you too",
    "same to you",
    "no worries",
    "no problem",
    "np",
    "you're welcome",
    "youre welcome",
    "yw",
    "nvm",
    "never mind",
    "nevermind",
    "my bad",
    "sorry",
    "d'accord",
    "daccord",
    "vale",
    "genial",
    "claro",
    "perfecto",
    "parfait",
    "super",
    "génial",
    "genau",
    "prima",
    "klasse",
    "va bene",
    "perfetto",
    "certo",
    "mdr",
    "ок",
    "хорошо",
    "понятно",
    "отлично",
    "ладно",
    "了解",
    "好的",
    "なるほど",
    "알겠습니다",
    "tamam",
];

const FAREWELLS: &[&str] = &[
    "bye",
    "goodbye",
    "good bye",
    "bye bye",
    "byebye",
    "see you",
    "see ya",
    "see you later",
    "see you soon",
    "see you tomorrow",
    "cya",
    "later",
    "laters",
    "catch you later",
    "ttyl",
    "take care",
    "good night",
    "goodnight",
    "gn",
    "night",
    "nighty night",
    "night night",
    "have a good one",
    "have a nice day",
    "have a good day",
    "have a great day",
    "adios",
    "adiós",
    "hasta luego",
    "hasta mañana",
    "au revoir",
    "à bientôt",
    "a bientot",
    "bonne nuit",
    "tschüss",
    "tschüs",
    "tschuss",
    "auf wiedersehen",
    "gute nacht",
    "arrivederci",
    "buonanotte",
    "tchau",
    "até logo",
    "ate logo",
    "doei",
    "hoşça kal",
    "güle güle",
    "пока",
    "до свидания",
    "спокойной ночи",
    "sayonara",
    "さようなら",
    "おやすみ",
    "再见",
    "晚安",
    "안녕히 가세요",
];

const FILLERS: &[&str] = &[
    "there",
    "all",
    "everyone",
    "everybody",
    "folks",
    "guys",
    "y'all",
    "yall",
    "team",
    "friend",
    "friends",
    "buddy",
    "mate",
    "man",
    "dude",
    "bro",
    "bot",
    "grok",
    "again",
    "and",
    "then",
    "so",
    "for now",
    "for that",
    "for this",
    "for the help",
    "for your help",
    "for all the help",
    "for everything",
    "for the answer",
    "for the info",
    "for the information",
    "for the explanation",
    "for the reply",
    "amigo",
    "amigos",
    "à tous",
    "a tous",
    "tout le monde",
    "a todos",
    "todos",
    "a tutti",
    "tutti",
    "zusammen",
    "allerseits",
    "alle",
    "всем",
    "mon ami",
    "mein freund",
];

const EMOTICONS: &[&str] = &[
    ":)", ":-)", ":(", ":-(", ":d", ":-d", ";)", ";-)", ":p", ":-p", "^^", "^_^", ":o", "=)", "(:",
    ":]",
];

/// Longest phrase in words.
const MAX_PHRASE_WORDS: usize = 4;

/// Squeezed phrase -> category.
static SMALL_TALK: LazyLock<HashMap<String, Small>> = LazyLock::new(|| {
    let mut map = HashMap::new();
    // Later lists do not override earlier ones ("good" stays an acknowledgement).
    for (list, cat) in [
        (GREETINGS, Small::Greeting),
        (THANKS, Small::Thanks),
        (FAREWELLS, Small::Farewell),
        (ACKS, Small::Ack),
        (FILLERS, Small::Filler),
    ] {
        for phrase in list {
            let key = phrase
                .split_whitespace()
                .map(squeeze)
                .collect::<Vec<_>>()
                .join(" ");
            map.entry(key).or_insert(cat);
        }
    }
    map
});

/// Collapse runs of the same character: "heyyy" -> "hey", "good" -> "god" (applied to both the
/// vocabulary and the message, so comparisons stay consistent).
fn squeeze(word: &str) -> String {
    let mut out = String::with_capacity(word.len());
    let mut last = None;
    for c in word.chars() {
        if Some(c) != last {
            out.push(c);
        }
        last = Some(c);
    }
    out
}

/// "haha", "hehehe", "jajaja", "ahah".
fn is_laugh(word: &str) -> bool {
    let b = word.as_bytes();
    if b.len() < 4 || !b.is_ascii() {
        return false;
    }
    let h = |c: u8| c == b'h' || c == b'j';
    let v = |c: u8| matches!(c, b'a' | b'e' | b'i' | b'o');
    let pairs_from = |off: usize| {
        b[off..]
            .chunks(2)
            .all(|p| h(p[0]) && (p.len() == 1 || v(p[1])))
    };
    pairs_from(0) || (v(b[0]) && pairs_from(1))
}

fn is_emoji(c: char) -> bool {
    matches!(c,
        '\u{1F000}'..='\u{1FAFF}'
        | '\u{2600}'..='\u{27BF}'
        | '\u{2B00}'..='\u{2BFF}'
        | '\u{FE0F}'
        | '\u{200D}'
        | '\u{20E3}'
        | '\u{3030}'
        | '\u{303D}'
    )
}

/// Punctuation that separates words in small talk (anything else non-space is part of a word).
fn is_soft_punct(c: char) -> bool {
    matches!(
        c,
        ',' | '.'
            | '!'
            | ';'
            | ':'
            | '~'
            | '-'
            | '('
            | ')'
            | '"'
            | '\''
            | '*'
            | '¡'
            | '«'
            | '»'
            | '…'
            | '、'
            | '。'
            | '！'
            | '，'
            | '～'
            | '\u{2010}'..='\u{2027}'
    )
}

/// Characters that mean "not small talk": questions, digits, code and URL symbols.
fn is_guard(c: char) -> bool {
    matches!(
        c,
        '?' | '？'
            | '¿'
            | '`'
            | '{'
            | '}'
            | '['
            | ']'
            | '<'
            | '>'
            | '='
            | '/'
            | '\\'
            | '|'
            | '@'
            | '#'
            | '$'
            | '%'
            | '^'
            | '&'
            | '+'
            | '_'
    ) || c.is_numeric()
}

/// The normalised text when a message is short enough to be small talk.
fn trivial_candidate(trimmed: &str) -> Option<String> {
    // Cheap bound first (a char is at most 4 bytes; leave room for whitespace runs).
    if trimmed.len() > TRIVIAL_MAX_CHARS * 8 {
        return None;
    }
    let norm = normalise(trimmed);
    (norm.chars().count() <= TRIVIAL_MAX_CHARS).then_some(norm)
}

/// The trivial rule ids when the whole normalised message is small talk.
fn trivial(norm: &str) -> Option<Vec<&'static str>> {
    if norm.len() > TRIVIAL_MAX_CHARS * 4
        || norm.chars().count() > TRIVIAL_MAX_CHARS
        || norm.split(' ').count() > TRIVIAL_MAX_WORDS
        || norm.contains("http")
        || norm.contains("www.")
    {
        return None;
    }
    let mut seen = [false; 4];
    let mut cleaned = String::with_capacity(norm.len());
    for token in norm.split(' ') {
        if EMOTICONS.contains(&token) {
            seen[2] = true;
            continue;
        }
        if token.chars().any(is_guard) {
            return None;
        }
        for c in token.chars() {
            if is_emoji(c) {
                seen[2] = true;
                cleaned.push(' ');
            } else if c == '\'' {
                cleaned.push('\'');
            } else if is_soft_punct(c) {
                cleaned.push(' ');
            } else {
                cleaned.push(c);
            }
        }
        cleaned.push(' ');
    }
    let words: Vec<String> = cleaned
        .split_whitespace()
        .map(|w| w.trim_matches('\''))
        .filter(|w| !w.is_empty())
        .map(squeeze)
        .collect();
    let map = &*SMALL_TALK;
    let mut i = 0;
    while i < words.len() {
        let mut matched = None;
        for n in (1..=MAX_PHRASE_WORDS.min(words.len() - i)).rev() {
            let key = words[i..i + n].join(" ");
            if let Some(cat) = map.get(&key) {
                matched = Some((n, *cat));
                break;
            }
        }
        let (n, cat) = match matched {
            Some(m) => m,
            None if is_laugh(&words[i]) => (1, Small::Ack),
            None => return None,
        };
        match cat {
            Small::Greeting => seen[0] = true,
            Small::Thanks => seen[1] = true,
            Small::Ack => seen[2] = true,
            Small::Farewell => seen[3] = true,
            Small::Filler => {}
        }
        i += n;
    }
    const IDS: [&str; 4] = [
        "trivial:greeting",
        "trivial:thanks",
        "trivial:ack",
        "trivial:farewell",
    ];
    let rules: Vec<&'static str> = IDS
        .iter()
        .zip(seen)
        .filter(|(_, s)| *s)
        .map(|(id, _)| *id)
        .collect();
    if rules.is_empty() {
        None
    } else {
        Some(rules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decision {
        decide(text, &RouterOptions::default())
    }

    use Route::{GrokDirect as D, ReasonThenGrok as R, TrivialDirect as T, WebThenGrok as W};
    use RouterSource::{Default as Def, Forced as F, Heuristic as H};

    /// (message, route, source, rule ids that must be among the matched ones)
    const TABLE: &[(&str, Route, RouterSource, &[&str])] = &[
        // forced prefixes (any case), stripped from the text
        ("!web what is rust", W, F, &["forced:web"]),
        ("!WEB what is rust", W, F, &["forced:web"]),
        ("!think what is 2+2", R, F, &["forced:think"]),
        ("!Fast hello", T, F, &["forced:fast"]),
        ("!direct latest news please", D, F, &["forced:direct"]),
        ("!think", R, F, &["forced:think"]),
        // not a prefix: another word, or not at the start
        ("!webhook setup help", D, Def, &[]),
        ("tell me !web things", D, Def, &[]),
        // trivial, several languages
        ("hi", T, H, &["trivial:greeting"]),
        ("Hello there!", T, H, &["trivial:greeting"]),
        ("good morning grok", T, H, &["trivial:greeting"]),
        ("heyyy 👋", T, H, &["trivial:greeting", "trivial:ack"]),
        ("thanks!", T, H, &["trivial:thanks"]),
        ("thanks so much for the help", T, H, &["trivial:thanks"]),
        ("thank you so much for all the help", D, Def, &[]),
        ("ok cool", T, H, &["trivial:ack"]),
        ("👍", T, H, &["trivial:ack"]),
        ("hahaha", T, H, &["trivial:ack"]),
        ("bye, see you later", T, H, &["trivial:farewell"]),
        ("merci beaucoup !", T, H, &["trivial:thanks"]),
        ("Danke schön", T, H, &["trivial:thanks"]),
        ("¡Hola amigo!", T, H, &["trivial:greeting"]),
        ("Bonjour à tous", T, H, &["trivial:greeting"]),
        ("спасибо большое", T, H, &["trivial:thanks"]),
        ("谢谢", T, H, &["trivial:thanks"]),
        ("ありがとうございます", T, H, &["trivial:thanks"]),
        ("ok, thanks, bye", T, H, &["trivial:thanks", "trivial:ack", "trivial:farewell"]),
        // trivial guards: question mark, digits, URL, too long, code, extra words
        ("hi?", D, Def, &[]),
        ("thanks 2", D, Def, &[]),
        ("hi https://matrix.org", W, H, &["web:url"]),
        ("hello hello hello hello hello hello hello", D, Def, &[]),
        ("ok `x`", D, Def, &[]),
        ("hi, can you explain what Matrix federation is?", D, Def, &[]),
        ("thanks, and what is an appservice?", D, Def, &[]),
        ("hey, quick question", D, Def, &[]),
        ("yes", D, Def, &[]),
        // generic words are not web cues
        ("what is a monad?", D, Def, &[]),
        ("explain how photosynthesis works", D, Def, &[]),
        ("what is the best pizza topping", D, Def, &[]),
        ("tell me about the roman empire", D, Def, &[]),
        ("write a haiku about autumn", D, Def, &[]),
        ("who was the first president of the united states", D, Def, &["web:topic_hint"]),
        // web
        ("summarize https://example.org/blog/post-1", W, H, &["web:url"]),
        ("is the matrix.org homeserver down right now?", W, H, &["web:url", "web:temporal", "web:fresh_topic"]),
        ("search for recent papers on speculative decoding", W, H, &["web:search"]),
        ("can you look up the population of Lagos", W, H, &["web:search"]),
        ("cite sources for the health effects of coffee", W, H, &["web:search"]),
        ("what's trending on X", W, H, &["web:social"]),
        ("what did the fed announce yesterday", W, H, &["web:temporal"]),
        ("latest news about the Rust 2027 edition", W, H, &["web:temporal", "web:year", "web:fresh_topic"]),
        ("best movies of 2026", W, H, &["web:year"]),
        ("what's the weather in Berlin", W, H, &["web:fresh_topic"]),
        ("exchange rate EUR to USD", W, H, &["web:fresh_topic"]),
        ("who won the champions league final", W, H, &["web:fresh_topic"]),
        ("release date of the next zelda game", W, H, &["web:fresh_topic"]),
        ("is the current version of python still 3.12", W, H, &["web:temporal_hint", "web:topic_hint"]),
        // web wins over reasoning
        ("compare the latest iPhone and Pixel prices", W, H, &["web:temporal", "reason:compare"]),
        ("solve today's wordle step by step", W, H, &["web:temporal", "reason:math", "reason:step_by_step"]),
        // ... but weak web hints do not beat a strong reasoning cue
        ("write a python function that returns the current version", R, H, &["reason:code_task"]),
        // reasoning
        ("what is 17 * 23 + 4?", R, H, &["reason:arithmetic"]),
        ("what's 100/4", R, H, &["reason:arithmetic"]),
        ("solve 3x + 7 = 22 for x", R, H, &["reason:math", "reason:arithmetic"]),
        ("prove that the square root of 2 is irrational", R, H, &["reason:math"]),
        ("integrate x^2 sin x", R, H, &["reason:math"]),
        ("how many ways can 5 people sit around a round table", R, H, &["reason:math"]),
        ("simplify \\frac{x^2}{x}", R, H, &["reason:latex"]),
        ("what is $$\\sum_{i=1}^n i$$", R, H, &["reason:latex"]),
        ("why does this panic?\n```rust\nlet v: Vec<u8> = vec![];\nv[0];\n```", R, H, &["reason:code_fence"]),
        ("Traceback (most recent call last):\n  File \"a.py\", line 3\nZeroDivisionError: division by zero", R, H, &["reason:stack_trace"]),
        ("thread 'main' panicked at src/main.rs:2:5", R, H, &["reason:stack_trace"]),
        ("error[E0382]: borrow of moved value: `v`", R, H, &["reason:stack_trace"]),
        ("fn main() { let mut x = 1; }", R, H, &["reason:code"]),
        ("SELECT * FROM users WHERE id = 1", R, H, &["reason:code"]),
        ("write a function in Rust that reverses a linked list", R, H, &["reason:code_task"]),
        ("help me debug my react component", R, H, &["reason:code_task"]),
        ("write a regex for email addresses", R, H, &["reason:code_task"]),
        ("explain step by step how a bill becomes law", R, H, &["reason:step_by_step"]),
        ("pros and cons of remote work", R, H, &["reason:compare"]),
        ("compare postgres vs sqlite", R, H, &["reason:compare", "reason:compare_hint"]),
        ("what is a monad? how is it used in haskell?", R, H, &["reason:multi_question"]),
        ("design a database schema for a library", R, H, &["reason:code_task"]),
        // weak hints only: ambiguous default, or ambiguous heuristic when two hints agree
        ("what's the difference between a virus and a bacterium", D, Def, &["reason:compare_hint"]),
        ("explain what a closure is in javascript", D, Def, &["reason:code_hint"]),
        ("plan an algorithm for my chores", R, H, &["reason:code_hint", "reason:planning_hint"]),
        // code fences hide their contents from the web cues
        ("why won't this build?\n```toml\nfoo = { git = \"https://github.com/a/b\" }\n```", R, H, &["reason:code_fence"]),
        // unicode, emoji, empty
        ("", D, Def, &[]),
        ("   \n\t ", D, Def, &[]),
        ("🤔🤔🤔 数据 和 模型 café", D, Def, &[]),
        ("Что нового сегодня? 📰", D, Def, &[]),
        ("what’s the weather tomorrow", W, H, &["web:temporal", "web:fresh_topic"]),
    ];

    #[test]
    fn table() {
        let mut failures = Vec::new();
        for (text, route, source, rules) in TABLE {
            let got = d(text);
            let missing: Vec<_> = rules.iter().filter(|r| !got.rules.contains(r)).collect();
            if got.route != *route || got.source != *source || !missing.is_empty() {
                failures.push(format!(
                    "{text:?}: want {route:?}/{source:?} with {rules:?}, got {:?}/{:?} {:?}",
                    got.route, got.source, got.rules
                ));
            }
        }
        assert!(TABLE.len() >= 40);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn invariants_hold_for_every_table_message() {
        for (text, ..) in TABLE {
            let got = d(text);
            assert!(
                (0.0..=1.0).contains(&got.confidence),
                "{text:?}: confidence {}",
                got.confidence
            );
            assert!(
                !matches!(
                    got.source,
                    RouterSource::Classifier | RouterSource::Degraded
                ),
                "{text:?}"
            );
            if got.source == RouterSource::Heuristic || got.source == RouterSource::Forced {
                assert!(!got.rules.is_empty(), "{text:?}: no rules");
            }
            for r in &got.rules {
                assert!(RULE_IDS.contains(r), "{text:?}: unknown rule {r}");
            }
            assert_eq!(got, d(text), "{text:?}: not deterministic");
        }
    }

    #[test]
    fn every_rule_fires_somewhere_in_the_table() {
        let mut seen: Vec<&str> = Vec::new();
        for (text, ..) in TABLE {
            seen.extend(d(text).rules);
        }
        seen.push(d(&"why is the sky blue. ".repeat(50)).rules[0]);
        for id in RULE_IDS {
            assert!(seen.contains(id), "rule {id} never fired");
        }
        for r in RULES {
            assert!(RULE_IDS.contains(&r.id), "{} missing from RULE_IDS", r.id);
        }
        assert_eq!(RULE_IDS.len(), RULES.len() + 8);
    }

    #[test]
    fn forced_prefix_is_stripped_and_keeps_case() {
        let got = d("  !web   What's NEW in Rust?  ");
        assert_eq!(got.route, Route::WebThenGrok);
        assert_eq!(got.source, RouterSource::Forced);
        assert_eq!(got.confidence, 1.0);
        assert_eq!(got.rules, vec!["forced:web"]);
        assert_eq!(got.text, "What's NEW in Rust?");
        assert!(!got.ambiguous);

        let only = d("!THINK");
        assert_eq!(only.route, Route::ReasonThenGrok);
        assert_eq!(only.text, "");
        let newline = d("!fast\nhello");
        assert_eq!(newline.route, Route::TrivialDirect);
        assert_eq!(newline.text, "hello");
        // Unforced text is trimmed, original case.
        assert_eq!(d("  Hello There  ").text, "Hello There");
    }

    #[test]
    fn confidence_scheme() {
        assert_eq!(d("hi").confidence, CONF_TRIVIAL);
        assert_eq!(d("what is a monad").confidence, CONF_DEFAULT);
        let hinted = d("what's the difference between a virus and a bacterium");
        assert_eq!(hinted.confidence, CONF_DEFAULT_HINTED);
        assert!(hinted.ambiguous);
        assert_eq!(d("prove it with a theorem").confidence, CONF_STRONG_ONE);
        let many = d("solve x^2 = 4 step by step");
        assert_eq!(many.confidence, CONF_STRONG_MANY);
        assert!(!many.ambiguous);
        let weak = d("is the current version of python still 3.12");
        assert_eq!(weak.route, Route::WebThenGrok);
        assert_eq!(weak.confidence, CONF_WEAK);
        assert!(weak.ambiguous);
        // Web won over a strong reasoning cue: penalised.
        let both = d("compare today's weather in Paris and Rome");
        assert_eq!(both.route, Route::WebThenGrok);
        assert!((both.confidence - (CONF_STRONG_MANY - CONF_CONFLICT_PENALTY)).abs() < 1e-9);
        assert!(!d("").ambiguous);
    }

    #[test]
    fn long_input_is_reasoning_and_respects_the_option() {
        let text = "tell me a story about a dog. ".repeat(40);
        let got = d(&text);
        assert_eq!(got.route, Route::ReasonThenGrok);
        assert!(got.rules.contains(&"reason:long_input"));
        let relaxed = RouterOptions {
            long_input_chars: 10_000,
            ..RouterOptions::default()
        };
        assert_eq!(decide(&text, &relaxed).route, Route::GrokDirect);
        // Long, but asking for the web at the very end: web still wins.
        let web = format!("{text} what's the weather today?");
        assert!(web.len() > LONG_REASON_SCAN_BYTES);
        assert_eq!(d(&web).route, Route::WebThenGrok);
        // Reasoning cues in the head of a long message are still reported.
        let traced = format!("thread 'main' panicked at src/main.rs:3:5 {text}");
        let got = d(&traced);
        assert_eq!(got.route, Route::ReasonThenGrok);
        assert!(got.rules.contains(&"reason:stack_trace"), "{:?}", got.rules);
    }

    #[test]
    fn cutoff_year_option() {
        let text = "best movies of 2025";
        assert_eq!(d(text).route, Route::WebThenGrok);
        let later = RouterOptions {
            cutoff_year: 2026,
            ..RouterOptions::default()
        };
        assert_eq!(decide(text, &later).route, Route::GrokDirect);
        // Years inside arithmetic, prices, versions or longer numbers do not count.
        for text in [
            "what is 2025 * 3",
            "what is 2030 - 7",
            "it costs $2030",
            "version v2026 notes",
            "port 20250",
            "the year 1999",
            "2026px wide",
        ] {
            assert!(!d(text).rules.contains(&"web:year"), "{text:?}");
        }
        for text in ["the 2025-2026 season", "on 2026-01-15", "in 2027, who"] {
            assert!(d(text).rules.contains(&"web:year"), "{text:?}");
        }
    }

    #[test]
    fn domains_and_lookalikes() {
        assert!(d("what is reddit.com").rules.contains(&"web:url"));
        assert!(d("check www.example.net please").rules.contains(&"web:url"));
        assert!(!d("mail me at bob@example.com").rules.contains(&"web:url"));
        assert!(!d("how do I start with asp.net core")
            .rules
            .contains(&"web:url"));
        assert!(d("asp.net vs example.io").rules.contains(&"web:url"));
        assert!(!d("edit main.rs and build.sh").rules.contains(&"web:url"));
        assert!(!d("e.g. this, i.e. that").rules.contains(&"web:url"));
    }

    #[test]
    fn question_counting() {
        assert_eq!(count_questions("what is x? and how does y work?"), 2);
        assert_eq!(count_questions("what? really??"), 0);
        assert_eq!(count_questions("is it ok？ 为什么 不行？"), 2);
        assert!(!d("what? really?").rules.contains(&"reason:multi_question"));
    }

    #[test]
    fn whitespace_and_apostrophes_do_not_matter() {
        let a = d("who   won\n\nthe  game\tlast night");
        assert_eq!(a.route, Route::WebThenGrok);
        assert_eq!(a.rules, d("who won the game last night").rules);
        assert_eq!(d("what’s new in rust").rules, d("what's new in rust").rules);
    }

    #[test]
    fn unicode_and_emoji_are_safe() {
        for text in [
            "🙂",
            "👨‍👩‍👧‍👦 family",
            "İstanbul'da hava nasıl",
            "ǅ",
            "\u{200B}",
            "a\u{0301}",
            "数据和模型？？",
            "🌞 today 🌞",
            "\u{FFFD}\u{FFFD}",
        ] {
            let got = d(text);
            assert!((0.0..=1.0).contains(&got.confidence), "{text:?}");
        }
        let big = "Привет 🌞 数据 ".repeat(300);
        assert_eq!(d(&big).route, Route::ReasonThenGrok);
    }

    #[test]
    fn normalise_lowercases_trims_and_collapses() {
        assert_eq!(normalise("  Hello\n\n  WORLD\t! "), "hello world !");
        assert_eq!(normalise("Ça  VA\u{00A0}Bien"), "ça va bien");
        assert_eq!(normalise("What’s UP"), "what's up");
        assert_eq!(normalise("ПРИВЕТ  Мир"), "привет мир");
        assert_eq!(normalise(""), "");
        assert_eq!(normalise(" \n "), "");
    }

    #[test]
    fn flex_makes_spaces_and_apostrophes_tolerant() {
        assert_eq!(flex("a b"), r"a\s+b");
        assert_eq!(flex("a ?b"), r"a\s*b");
        assert_eq!(flex(r"[a b]\ c"), r"[a b]\ c");
        assert_eq!(flex("it's"), "it(?:'|(?u:\u{2019}))s");
    }

    #[test]
    fn small_talk_helpers() {
        assert_eq!(squeeze("heyyy"), "hey");
        assert!(is_laugh("hahaha"));
        assert!(is_laugh("jajaja"));
        assert!(!is_laugh("hash"));
        assert!(trivial("ok ok ok").is_some());
        assert!(
            trivial("grok").is_none(),
            "fillers alone are not small talk"
        );
        assert!(trivial("hi *waves*").is_none());
    }
}
