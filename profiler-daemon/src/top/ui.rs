//! The terminal interface of `pyebpf top` (ratatui + crossterm).
//!
//! [`App`] holds the state and turns keys into [`Action`]s; [`draw`] renders
//! it. Neither touches the terminal, so both are tested against ratatui's
//! `TestBackend`. [`run`] owns the real terminal: raw mode and the alternate
//! screen are entered through a [`TerminalGuard`], which leaves them on every
//! way out (return, error, panic, SIGTERM/SIGHUP/SIGINT, Ctrl-C key); a
//! watchdog ends the process when the terminal itself goes away.
use std::io::{self, IsTerminal as _, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use crossterm::{cursor, execute};
use ratatui::backend::CrosstermBackend;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{
    Block, Borders, Cell, Clear, HighlightSpacing, Paragraph, Row, Table, TableState,
};
use ratatui::{Frame, Terminal};
use tokio::runtime::Runtime;

use super::display::{format_duration, percent, seconds_of};
use super::source::TopSource;
use super::{python_or_dash, rate_label, window_label, TopOptions};
use crate::model::top::{filtered_sorted, FunctionRow, SortKey, TopQuery, TopSnapshot};

/// How often the view is refreshed.
pub const REFRESH: Duration = Duration::from_secs(1);

/// Which table is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    Functions,
    Processes,
}

/// What the event loop must do after a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing beyond a redraw.
    None,
    /// The query changed: fetch a snapshot now (even when paused).
    Refetch,
    Quit,
}

/// The state of the interface.
pub struct App {
    /// `local` or `daemon URL`.
    pub mode: String,
    pub snapshot: Option<TopSnapshot>,
    pub view: View,
    pub sort: SortKey,
    pub line_level: bool,
    pub whole_run: bool,
    pub window_secs: u32,
    pub paused: bool,
    /// Applied text filter.
    pub filter: String,
    /// The filter being typed after `/`.
    pub editing: Option<String>,
    pub help: bool,
    /// `--pid` of the command line.
    pub base_pids: Vec<u32>,
    /// `--service` of the command line.
    pub service: Option<String>,
    /// A process chosen in the process view.
    pub process_filter: Option<u32>,
    pub functions_state: TableState,
    pub processes_state: TableState,
    /// Last fetch error, shown until a fetch succeeds.
    pub error: Option<String>,
    /// The profile type shown; `m` cycles through the source's types.
    pub kind: crate::profile::ProfileKind,
}

impl App {
    pub fn new(mode: String, opts: &TopOptions) -> Self {
        App {
            mode,
            snapshot: None,
            view: View::Functions,
            sort: SortKey::Own,
            line_level: opts.line_level,
            whole_run: false,
            window_secs: opts.window_secs,
            paused: false,
            filter: String::new(),
            editing: None,
            help: false,
            base_pids: opts.pids.clone(),
            service: opts.service.clone(),
            process_filter: None,
            functions_state: TableState::default().with_selected(Some(0)),
            processes_state: TableState::default().with_selected(Some(0)),
            error: None,
            kind: crate::profile::ProfileKind::Cpu,
        }
    }

    /// The query the current state asks.
    pub fn query(&self) -> TopQuery {
        TopQuery {
            seconds: (!self.whole_run).then_some(self.window_secs),
            pids: match self.process_filter {
                Some(p) => vec![p],
                None => self.base_pids.clone(),
            },
            service: self.service.clone(),
            line_level: self.line_level,
            // The daemon's default bound (1000 rows by own and by total).
            limit: None,
            kind: self.kind,
        }
    }

    /// The type after the one shown, among those the source holds (as the
    /// last snapshot says); `None` with a single type.
    fn next_kind(&self) -> Option<crate::profile::ProfileKind> {
        use crate::profile::ProfileKind;
        let types: Vec<ProfileKind> = self
            .snapshot
            .as_ref()
            .map(|s| {
                ProfileKind::ALL
                    .into_iter()
                    .filter(|k| s.types.iter().any(|t| t == k.name()))
                    .collect()
            })
            .unwrap_or_default();
        if types.len() < 2 {
            return None;
        }
        let at = types.iter().position(|k| *k == self.kind);
        Some(types[at.map_or(0, |i| (i + 1) % types.len())])
    }

    pub fn set_snapshot(&mut self, s: TopSnapshot) {
        self.snapshot = Some(s);
        self.error = None;
        self.clamp_selection();
    }

    pub fn set_error(&mut self, e: String) {
        self.error = Some(e);
    }

    /// The function rows shown: filtered and sorted.
    pub fn function_rows(&self) -> Vec<FunctionRow> {
        self.snapshot
            .as_ref()
            .map(|s| filtered_sorted(&s.functions, &self.filter, self.sort))
            .unwrap_or_default()
    }

    fn rows_in(&self, view: View) -> usize {
        match view {
            View::Functions => self.function_rows().len(),
            View::Processes => self.snapshot.as_ref().map_or(0, |s| s.processes.len()),
        }
    }

    fn clamp_selection(&mut self) {
        let nf = self.rows_in(View::Functions);
        let np = self.rows_in(View::Processes);
        for (st, n) in [
            (&mut self.functions_state, nf),
            (&mut self.processes_state, np),
        ] {
            let sel = st.selected().unwrap_or(0).min(n.saturating_sub(1));
            st.select(Some(sel));
        }
    }

    fn move_selection(&mut self, delta: isize) {
        let n = self.rows_in(self.view);
        let st = match self.view {
            View::Functions => &mut self.functions_state,
            View::Processes => &mut self.processes_state,
        };
        let cur = st.selected().unwrap_or(0) as isize;
        let next = cur
            .saturating_add(delta)
            .clamp(0, n.saturating_sub(1) as isize);
        st.select(Some(next as usize));
    }

    /// Handles one key press.
    pub fn handle_key(&mut self, key: KeyEvent) -> Action {
        if key.kind == KeyEventKind::Release {
            return Action::None;
        }
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        if ctrl && matches!(key.code, KeyCode::Char('c') | KeyCode::Char('C')) {
            return Action::Quit;
        }
        if let Some(text) = self.editing.as_mut() {
            match key.code {
                KeyCode::Enter => {
                    self.filter = self.editing.take().unwrap_or_default().trim().to_string();
                    self.functions_state.select(Some(0));
                }
                KeyCode::Esc => self.editing = None,
                KeyCode::Backspace => {
                    text.pop();
                }
                KeyCode::Char(c) if !ctrl => text.push(c),
                _ => {}
            }
            return Action::None;
        }
        if self.help {
            // Any key closes the help; q still quits.
            self.help = false;
            return if key.code == KeyCode::Char('q') {
                Action::Quit
            } else {
                Action::None
            };
        }
        match key.code {
            KeyCode::Char('q') => return Action::Quit,
            KeyCode::Char('?') | KeyCode::F(1) => self.help = true,
            KeyCode::Char('o') => self.set_sort(SortKey::Own),
            KeyCode::Char('t') => self.set_sort(SortKey::Total),
            KeyCode::Char('n') => self.set_sort(SortKey::Name),
            KeyCode::Char('l') => {
                self.line_level = !self.line_level;
                return Action::Refetch;
            }
            KeyCode::Char('w') => {
                self.whole_run = !self.whole_run;
                return Action::Refetch;
            }
            KeyCode::Char('m') => {
                if let Some(k) = self.next_kind() {
                    self.kind = k;
                    return Action::Refetch;
                }
            }
            KeyCode::Char('p') | KeyCode::Char(' ') => self.paused = !self.paused,
            KeyCode::Char('/') => self.editing = Some(self.filter.clone()),
            KeyCode::Tab | KeyCode::BackTab => {
                self.view = match self.view {
                    View::Functions => View::Processes,
                    View::Processes => View::Functions,
                }
            }
            KeyCode::Enter if self.view == View::Processes => {
                let chosen = self.snapshot.as_ref().and_then(|s| {
                    s.processes
                        .get(self.processes_state.selected().unwrap_or(0))
                        .map(|p| p.pid)
                });
                if let Some(pid) = chosen {
                    self.process_filter = Some(pid);
                    self.view = View::Functions;
                    self.functions_state.select(Some(0));
                    self.processes_state.select(Some(0));
                    return Action::Refetch;
                }
            }
            KeyCode::Esc => {
                self.filter.clear();
                if self.process_filter.take().is_some() {
                    return Action::Refetch;
                }
            }
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::PageDown => self.move_selection(20),
            KeyCode::PageUp => self.move_selection(-20),
            KeyCode::Home | KeyCode::Char('g') => self.move_selection(isize::MIN),
            KeyCode::End | KeyCode::Char('G') => self.move_selection(isize::MAX),
            _ => {}
        }
        Action::None
    }

    fn set_sort(&mut self, key: SortKey) {
        self.sort = key;
        self.functions_state.select(Some(0));
    }
}

/// Width of `s` in terminal cells.
fn width(s: &str) -> usize {
    Span::raw(s).width()
}

/// The longest tail of `s` at most `max` cells wide.
fn tail_fitting(s: &str, max: usize) -> &str {
    let mut used = 0;
    let mut start = s.len();
    for (i, c) in s.char_indices().rev() {
        let mut buf = [0u8; 4];
        let w = width(c.encode_utf8(&mut buf));
        if used + w > max {
            break;
        }
        used += w;
        start = i;
    }
    &s[start..]
}

/// `qualname (file:line)` in at most `max` cells. What is cut, in order:
/// the directories of the file from the left (`…/pkg/mod.py`), then the
/// whole location, and only then the qualified name, from the left, so the
/// innermost function name stays visible (`…<locals>.inner`).
pub fn fit_function(qualname: &str, filename: &str, line: u32, max: usize) -> String {
    let full = format!("{qualname} ({filename}:{line})");
    if width(&full) <= max {
        return full;
    }
    let prefix = format!("{qualname} (…");
    let suffix = format!(":{line})");
    let room = max.saturating_sub(width(&prefix) + width(&suffix));
    let base = filename.rsplit('/').next().unwrap_or(filename);
    // At least `/basename` must fit for the location to be worth showing.
    if room > width(base) {
        let tail = tail_fitting(filename, room);
        // Start the tail at a directory boundary.
        let tail = match tail.find('/') {
            Some(i) => &tail[i..],
            None => tail,
        };
        return format!("{prefix}{tail}{suffix}");
    }
    if width(qualname) <= max {
        return qualname.to_string();
    }
    if max == 0 {
        return String::new();
    }
    format!("…{}", tail_fitting(qualname, max - 1))
}

/// Columns of the function table that fit in `width` cells: title and
/// width of each, the function column (`None`) taking the rest. Narrow
/// terminals lose the Python version first, then the command and service,
/// then the pid and the total time.
fn function_columns(width: u16) -> Vec<(&'static str, Option<u16>)> {
    let mut cols = vec![("OWN%", Some(6)), ("TOTAL%", Some(6)), ("OWN", Some(7))];
    if width >= 70 {
        cols.push(("TOTAL", Some(7)));
    }
    cols.push(("FUNCTION", None));
    if width >= 60 {
        cols.push(("PID", Some(7)));
    }
    if width >= 100 {
        cols.push(("COMMAND", Some(15)));
        if width >= 110 {
            cols.push(("PYTHON", Some(6)));
        }
        cols.push(("SERVICE", Some(16)));
    }
    cols
}

/// Marks the selected row (also visible in plain-text captures).
const HIGHLIGHT: &str = "> ";

fn bold() -> Style {
    Style::new().add_modifier(Modifier::BOLD)
}

fn field(name: &str, value: String) -> Vec<Span<'static>> {
    vec![Span::raw(format!("{name} ")), Span::styled(value, bold())]
}

/// Lays out `fields` on as few lines of `width` cells as it takes, two
/// spaces apart, never cutting a field (one wider than the line is cut by
/// the paragraph, alone on its line).
fn pack(fields: Vec<Vec<Span<'static>>>, width: usize) -> Vec<Line<'static>> {
    let mut lines = Vec::new();
    let mut cur: Vec<Span<'static>> = Vec::new();
    let mut used = 0;
    for f in fields {
        let w: usize = f.iter().map(Span::width).sum();
        if !cur.is_empty() && used + 2 + w > width {
            lines.push(Line::from(std::mem::take(&mut cur)));
            used = 0;
        }
        if !cur.is_empty() {
            cur.push(Span::raw("  "));
            used += 2;
        }
        cur.extend(f);
        used += w;
    }
    if !cur.is_empty() {
        lines.push(Line::from(cur));
    }
    lines
}

/// The header: what is sampled (first lines), and how it is viewed.
fn header_lines(app: &App, width: u16) -> Vec<Line<'static>> {
    let q = app.query();
    let s = app.snapshot.clone().unwrap_or_default();
    let warn = |n: u64| {
        if n > 0 {
            Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)
        } else {
            bold()
        }
    };
    let first = vec![
        vec![Span::styled("pyebpf top", bold())],
        field("mode", app.mode.clone()),
        field("type", app.kind.name().to_string()),
        field("rate", rate_label(s.rate_hz)),
        field("samples/s", format!("{:.0}", s.samples_per_sec)),
        field("processes", s.processes_profiled.to_string()),
        vec![
            Span::raw("drops "),
            Span::styled(s.drops.to_string(), warn(s.drops)),
        ],
        vec![
            Span::raw("errors "),
            Span::styled(s.errors.to_string(), warn(s.errors)),
        ],
    ];
    let mut second = vec![
        field("window", window_label(&q, app.snapshot.as_ref())),
        field(
            "level",
            if app.line_level { "line" } else { "function" }.to_string(),
        ),
        field("sort", app.sort.as_str().to_string()),
        match s.profile_kind().unit() {
            crate::profile::ValueUnit::Samples => field("samples", s.total_samples.to_string()),
            // Nanosecond profiles: their total is time, not a count.
            crate::profile::ValueUnit::Nanoseconds => field(
                "time",
                format_duration(seconds_of(s.total_samples, s.values_per_sec())),
            ),
        },
    ];
    if !q.pids.is_empty() {
        let pids: Vec<String> = q.pids.iter().map(u32::to_string).collect();
        second.push(field("pid", pids.join(",")));
    }
    if let Some(svc) = &q.service {
        second.push(field("service", svc.clone()));
    }
    if !app.filter.is_empty() {
        second.push(field("filter", format!("\"{}\"", app.filter)));
    }
    if app.paused {
        second.push(vec![Span::styled(
            "PAUSED",
            Style::new()
                .fg(Color::Black)
                .bg(Color::Yellow)
                .add_modifier(Modifier::BOLD),
        )]);
    }
    let w = usize::from(width.max(1));
    let mut lines = pack(first, w);
    lines.extend(pack(second, w));
    lines
}

fn footer_line(app: &App) -> Line<'static> {
    if let Some(text) = &app.editing {
        return Line::from(vec![
            Span::styled("filter: /", bold()),
            Span::raw(text.clone()),
            Span::styled("_", Style::new().add_modifier(Modifier::SLOW_BLINK)),
            Span::raw("   (Enter: apply, Esc: cancel)"),
        ]);
    }
    if let Some(e) = &app.error {
        return Line::from(Span::styled(
            format!("error: {e}"),
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ));
    }
    let hint = match app.view {
        View::Functions => {
            "Tab processes  o/t/n sort  l lines  w window  m type  / filter  p pause  ? help  q quit"
        }
        View::Processes => {
            "Enter show this process  Esc all processes  Tab functions  ? help  q quit"
        }
    };
    Line::from(Span::styled(hint, Style::new().add_modifier(Modifier::DIM)))
}

fn right(s: String) -> Cell<'static> {
    Cell::from(Line::from(s).right_aligned())
}

fn empty_message(f: &mut Frame, area: Rect, msg: &str) {
    if area.height > 1 {
        let r = Rect {
            y: area.y + 1,
            height: 1,
            ..area
        };
        f.render_widget(
            Paragraph::new(msg.to_string()).style(Style::new().add_modifier(Modifier::DIM)),
            r,
        );
    }
}

fn draw_functions(f: &mut Frame, app: &mut App, area: Rect) {
    let snap = app.snapshot.clone().unwrap_or_default();
    let rows = app.function_rows();
    let cols = function_columns(area.width);
    let fixed: u16 = cols.iter().filter_map(|(_, w)| *w).sum();
    let spacing = cols.len().saturating_sub(1) as u16;
    let fn_width = area
        .width
        .saturating_sub(fixed + spacing + width(HIGHLIGHT) as u16) as usize;
    let header = Row::new(cols.iter().map(|(t, w)| match (*t, w) {
        ("COMMAND" | "PYTHON" | "SERVICE", _) | (_, None) => Cell::from(*t),
        _ => right(t.to_string()),
    }))
    .style(Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED));
    let (total, rate) = (snap.total_samples, snap.values_per_sec());
    let table_rows = rows.iter().map(|r| {
        Row::new(cols.iter().map(|(t, _)| match *t {
            "OWN%" => right(format!("{:.1}", percent(r.own, total))),
            "TOTAL%" => right(format!("{:.1}", percent(r.total, total))),
            "OWN" => right(format_duration(seconds_of(r.own, rate))),
            "TOTAL" => right(format_duration(seconds_of(r.total, rate))),
            "PID" => right(r.pid.to_string()),
            "COMMAND" => Cell::from(r.command.clone()),
            "PYTHON" => Cell::from(python_or_dash(&r.python).to_string()),
            "SERVICE" => Cell::from(r.service.clone()),
            _ => Cell::from(fit_function(
                &r.qualname,
                &r.filename,
                r.shown_line(),
                fn_width,
            )),
        }))
    });
    let widths = cols.iter().map(|(_, w)| match w {
        Some(w) => Constraint::Length(*w),
        None => Constraint::Fill(1),
    });
    let table = Table::new(table_rows, widths)
        .header(header)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol(HIGHLIGHT)
        .highlight_spacing(HighlightSpacing::Always);
    f.render_stateful_widget(table, area, &mut app.functions_state);
    if rows.is_empty() {
        let msg = if app.snapshot.is_none() {
            "waiting for the first snapshot..."
        } else if !app.filter.is_empty() {
            "no function matches the filter (Esc clears it)"
        } else {
            "no Python samples yet (profiled Python processes busy on a CPU show up here)"
        };
        empty_message(f, area, msg);
    }
}

/// The processes table's SAMPLES column.
const SAMPLES_COLUMN: usize = 1;

/// `columns` without the one at `at`, if any.
fn without_column<T>(mut columns: Vec<T>, at: Option<usize>) -> Vec<T> {
    if let Some(i) = at.filter(|i| *i < columns.len()) {
        columns.remove(i);
    }
    columns
}

fn draw_processes(f: &mut Frame, app: &mut App, area: Rect) {
    let snap = app.snapshot.clone().unwrap_or_default();
    // Sample counts only where values are counts: a nanosecond profile's
    // values are its time column.
    let counts = snap.profile_kind().unit() == crate::profile::ValueUnit::Samples;
    let keep = |columns| without_column(columns, (!counts).then_some(SAMPLES_COLUMN));
    let header = Row::new(keep(vec![
        right("PID".into()),
        right("SAMPLES".into()),
        right("SHARE%".into()),
        right(match snap.profile_kind() {
            crate::profile::ProfileKind::Cpu => "CPU TIME".into(),
            crate::profile::ProfileKind::Wall => "WALL".into(),
            crate::profile::ProfileKind::OffCpu => "OFF-CPU".into(),
        }),
        right("GIL%".into()),
        Cell::from("COMMAND"),
        Cell::from("PYTHON"),
        Cell::from("SERVICE"),
    ]))
    .style(Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED));
    let rows = snap.processes.iter().map(|p| {
        Row::new(keep(vec![
            right(p.pid.to_string()),
            right(p.samples.to_string()),
            right(format!("{:.1}", percent(p.samples, snap.total_samples))),
            right(format_duration(seconds_of(
                p.samples,
                snap.values_per_sec(),
            ))),
            right(p.gil_wait_permille.map_or_else(
                || "-".to_string(),
                |m| format!("{:.1}", f64::from(m) / 10.0),
            )),
            Cell::from(p.command.clone()),
            Cell::from(python_or_dash(&p.python).to_string()),
            Cell::from(p.service.clone()),
        ]))
    });
    let widths = without_column(
        vec![
            Constraint::Length(8),
            Constraint::Length(11),
            Constraint::Length(7),
            Constraint::Length(8),
            Constraint::Length(6),
            Constraint::Length(16),
            Constraint::Length(6),
            Constraint::Fill(1),
        ],
        (!counts).then_some(SAMPLES_COLUMN),
    );
    let table = Table::new(rows, widths)
        .header(header)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        .highlight_symbol(HIGHLIGHT)
        .highlight_spacing(HighlightSpacing::Always);
    f.render_stateful_widget(table, area, &mut app.processes_state);
    if snap.processes.is_empty() {
        empty_message(f, area, "no profiled Python process matches");
    }
}

/// Every key, for the help overlay (and the README).
pub const KEYS: &[(&str, &str)] = &[
    ("o / t / n", "sort by own samples / total samples / name"),
    ("l", "toggle line-level and function-level rows"),
    ("w", "toggle the last --window seconds and the whole run"),
    (
        "m",
        "cycle the profile type: cpu, wall, off-cpu (those the source has)",
    ),
    ("p, space", "pause / resume refreshing"),
    (
        "/",
        "filter by text (name or file); Enter applies, Esc cancels",
    ),
    ("Tab", "switch between functions and processes"),
    ("Enter", "in the process view: show only that process"),
    ("Esc", "clear the text filter and the process filter"),
    ("Up/Down, j/k", "move the selection (PgUp/PgDn, Home/End)"),
    ("?", "this help (any key closes it)"),
    ("q, Ctrl-C", "quit"),
];

fn draw_help(f: &mut Frame, area: Rect) {
    let mut lines = vec![
        Line::from(Span::styled("pyebpf top: keys", bold())),
        Line::from(""),
    ];
    for (k, what) in KEYS {
        lines.push(Line::from(vec![
            Span::styled(format!("{k:>13}  "), bold()),
            Span::raw(*what),
        ]));
    }
    lines.push(Line::from(""));
    lines.push(Line::from(
        "OWN: samples in the function's own code; TOTAL: samples with it on the stack.",
    ));
    let w = (lines.iter().map(Line::width).max().unwrap_or(40) as u16 + 4).min(area.width);
    let h = (lines.len() as u16 + 2).min(area.height);
    let r = area.centered(Constraint::Length(w), Constraint::Length(h));
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" help ")),
        r,
    );
}

/// Renders the whole screen.
pub fn draw(f: &mut Frame, app: &mut App) {
    let header = header_lines(app, f.area().width);
    let [head, body, foot] = Layout::vertical([
        Constraint::Length(header.len() as u16),
        Constraint::Fill(1),
        Constraint::Length(1),
    ])
    .areas(f.area());
    f.render_widget(Paragraph::new(header), head);
    match app.view {
        View::Functions => draw_functions(f, app, body),
        View::Processes => draw_processes(f, app, body),
    }
    f.render_widget(Paragraph::new(footer_line(app)), foot);
    if app.help {
        draw_help(f, f.area());
    }
}

/// Whether the terminal is in raw mode / the alternate screen, so that it
/// is restored exactly once, whoever gets there first.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Leaves the alternate screen, shows the cursor and disables raw mode, if
/// [`TerminalGuard`] had set them up. Safe to call from anywhere, repeatedly.
pub fn restore_terminal() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let mut out = io::stdout();
        let _ = execute!(out, LeaveAlternateScreen, cursor::Show);
        let _ = disable_raw_mode();
        let _ = out.flush();
    }
}

/// Raw mode and the alternate screen for as long as it lives.
pub struct TerminalGuard(());

impl TerminalGuard {
    pub fn enter() -> io::Result<Self> {
        install_panic_hook();
        enable_raw_mode()?;
        ACTIVE.store(true, Ordering::SeqCst);
        // From here on, Drop restores whatever was done.
        let guard = TerminalGuard(());
        execute!(io::stdout(), EnterAlternateScreen, cursor::Hide)?;
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Restores the terminal before the panic message is printed, so that it
/// is readable and the shell usable.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
    });
}

/// The interface needs a terminal on stdin and stdout.
pub fn check_terminal() -> anyhow::Result<()> {
    if !io::stdout().is_terminal() || !io::stdin().is_terminal() {
        anyhow::bail!("pyebpf top needs a terminal; for scripts use --once (with --json for JSON)");
    }
    Ok(())
}

/// Whether the controlling terminal is still there: once it is hung up
/// (terminal window closed, tmux/ssh session killed), ioctls on it fail.
fn terminal_alive() -> bool {
    // SAFETY: TIOCGWINSZ only writes a winsize into the buffer given.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) == 0 }
}

/// How long the loop may take to notice a quit request before the process
/// is ended from outside it.
const QUIT_GRACE: Duration = Duration::from_secs(3);

/// Sets `flag` on SIGTERM, SIGHUP or SIGINT, or when the terminal goes away,
/// so that the loop restores the terminal and stops sampling. The loop may
/// be stuck where it cannot see the flag (crossterm's event poll spins on a
/// hung-up terminal), so if it has not exited [`QUIT_GRACE`] later, the
/// terminal is restored (best effort) and the process exits from here
/// (closing the BPF descriptors detaches the sampler).
fn watch(rt: &Runtime, flag: Arc<AtomicBool>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let _enter = rt.enter();
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut int = signal(SignalKind::interrupt())?;
    let signalled = flag.clone();
    rt.spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = hup.recv() => {}
            _ = int.recv() => {}
        }
        signalled.store(true, Ordering::SeqCst);
    });
    rt.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut quit_since = None;
        let mut hung_up = false;
        loop {
            tick.tick().await;
            if !terminal_alive() {
                hung_up = true;
                flag.store(true, Ordering::SeqCst);
            }
            if flag.load(Ordering::SeqCst) {
                let since = *quit_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= QUIT_GRACE {
                    restore_terminal();
                    std::process::exit(if hung_up { 1 } else { 0 });
                }
            }
        }
    });
    Ok(())
}

fn fetch(src: &mut dyn TopSource, app: &mut App) {
    match src.snapshot(&app.query()) {
        Ok(s) => app.set_snapshot(s),
        Err(e) => app.set_error(format!("{e:#}")),
    }
}

/// Runs the interface until `q`, Ctrl-C or a signal.
pub fn run(src: &mut dyn TopSource, opts: &TopOptions, rt: &Runtime) -> anyhow::Result<()> {
    let quit = Arc::new(AtomicBool::new(false));
    watch(rt, quit.clone())?;
    let mut app = App::new(src.mode().describe(), opts);
    let guard = TerminalGuard::enter()?;
    let mut terminal = Terminal::new(CrosstermBackend::new(io::stdout()))?;
    terminal.clear()?;
    fetch(src, &mut app);
    let mut next = Instant::now() + REFRESH;
    let result = loop {
        if quit.load(Ordering::SeqCst) {
            break Ok(());
        }
        if let Err(e) = src.health() {
            break Err(e);
        }
        terminal.draw(|f| draw(f, &mut app))?;
        let wait = next
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(200));
        if event::poll(wait)? {
            match event::read()? {
                Event::Key(k) => match app.handle_key(k) {
                    Action::Quit => break Ok(()),
                    Action::Refetch => fetch(src, &mut app),
                    Action::None => {}
                },
                // Drawn at the new size right away.
                Event::Resize(..) => terminal.autoresize()?,
                _ => {}
            }
        }
        if Instant::now() >= next {
            if !app.paused {
                fetch(src, &mut app);
            }
            next = Instant::now() + REFRESH;
        }
    };
    drop(terminal);
    drop(guard);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::top::ProcessRow;
    use ratatui::backend::TestBackend;

    fn key(c: KeyCode) -> KeyEvent {
        KeyEvent::new(c, KeyModifiers::NONE)
    }

    fn row(name: &str, file: &str, pid: u32, own: u64, total: u64) -> FunctionRow {
        FunctionRow {
            qualname: name.into(),
            filename: file.into(),
            line: None,
            first_line: 10,
            pid,
            command: "python3".into(),
            service: format!("svc{pid}"),
            python: if pid == 11 { "3.11" } else { "3.14" }.into(),
            own,
            total,
        }
    }

    fn snap() -> TopSnapshot {
        TopSnapshot {
            rate_hz: 99,
            samples_per_sec: 198.0,
            processes_profiled: 2,
            drops: 0,
            errors: 3,
            total_samples: 1000,
            window_secs: 10,
            functions: vec![
                row("plain_function", "/srv/app/scenarios.py", 11, 600, 600),
                row("loop_forever", "/srv/app/scenarios.py", 11, 0, 600),
                row("split_c", "/srv/app/scenarios.py", 22, 200, 200),
                row("Zeta.method", "/usr/lib/python3.11/zeta.py", 22, 100, 150),
            ],
            processes: vec![
                ProcessRow {
                    pid: 11,
                    command: "python3".into(),
                    service: "svc11".into(),
                    python: "3.11".into(),
                    samples: 600,
                    gil_wait_permille: None,
                },
                ProcessRow {
                    pid: 22,
                    command: "python3".into(),
                    service: "svc22".into(),
                    python: "3.14".into(),
                    samples: 400,
                    gil_wait_permille: None,
                },
            ],
            functions_total: 4,
            processes_total: 2,
            kind: String::new(),
            types: Vec::new(),
        }
    }

    fn app() -> App {
        let mut a = App::new("local".into(), &TopOptions::default());
        a.set_snapshot(snap());
        a
    }

    /// The screen as text lines, trailing blanks trimmed.
    fn screen(app: &mut App, w: u16, h: u16) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, app)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..h)
            .map(|y| {
                let mut s = String::new();
                let mut skip = 0;
                for x in 0..w {
                    if skip > 0 {
                        skip -= 1;
                        continue;
                    }
                    let sym = buf[(x, y)].symbol();
                    skip = width(sym).saturating_sub(1);
                    s.push_str(sym);
                }
                s.trim_end().to_string()
            })
            .collect()
    }

    #[test]
    fn fits_functions_keeping_the_name() {
        let f = |w| fit_function("handle", "/srv/app/views/users.py", 42, w);
        assert_eq!(f(100), "handle (/srv/app/views/users.py:42)");
        assert_eq!(f(35), "handle (/srv/app/views/users.py:42)");
        assert_eq!(f(34), "handle (…/app/views/users.py:42)");
        assert_eq!(f(30), "handle (…/views/users.py:42)");
        assert_eq!(f(26), "handle (…/users.py:42)");
        assert_eq!(f(22), "handle (…/users.py:42)");
        assert_eq!(f(21), "handle");
        assert_eq!(f(6), "handle");
        assert_eq!(f(4), "…dle");
        assert_eq!(f(0), "");
        // The innermost name is kept when the qualname itself is too long.
        assert_eq!(
            fit_function("outer.<locals>.inner", "/a.py", 1, 10),
            "…ls>.inner"
        );
        // No directory: the file name as is, or nothing.
        assert_eq!(fit_function("f", "<string>", 1, 15), "f (<string>:1)");
        assert_eq!(fit_function("f", "<string>", 1, 13), "f");
        // Wide characters count as two cells.
        let s = fit_function("𠀀", "/very/long/path/to/mod.py", 7, 16);
        assert!(width(&s) <= 16, "{s}");
        assert_eq!(s, "𠀀 (…/mod.py:7)");
        for w in 0..60 {
            let s = fit_function("функция", "/ü/ü/ü/ü/ü.py", 123, w);
            assert!(width(&s) <= w, "{w}: {s}");
        }
    }

    /// `m` cycles through the types the snapshot lists, in cpu, wall,
    /// off-cpu order; with one type (an older daemon: none listed) it does
    /// nothing. The header names the type, the process view shows GIL%.
    #[test]
    fn m_cycles_profile_types() {
        use crate::profile::ProfileKind;
        let mut a = app();
        assert_eq!(a.handle_key(key(KeyCode::Char('m'))), Action::None);
        assert_eq!(a.query().kind, ProfileKind::Cpu);
        let mut s = snap();
        s.types = vec!["cpu".into(), "off-cpu".into(), "wall".into()];
        s.processes[0].gil_wait_permille = Some(375);
        a.set_snapshot(s);
        assert!(screen(&mut a, 120, 20)[0].contains("type cpu"));
        for want in [ProfileKind::Wall, ProfileKind::OffCpu, ProfileKind::Cpu] {
            assert_eq!(a.handle_key(key(KeyCode::Char('m'))), Action::Refetch);
            assert_eq!(a.query().kind, want);
            let top = screen(&mut a, 120, 20)[0].clone();
            assert!(top.contains(&format!("type {}", want.name())), "{top}");
        }
        a.handle_key(key(KeyCode::Tab));
        let lines = screen(&mut a, 120, 20);
        assert!(lines.iter().any(|l| l.contains("GIL%")), "{lines:#?}");
        assert!(lines.iter().any(|l| l.contains("37.5")), "{lines:#?}");
    }

    /// A nanosecond profile's values are time: the header says how much,
    /// and the processes table has no SAMPLES column.
    #[test]
    fn wall_shows_time_not_counts() {
        let mut a = app();
        let mut s = snap();
        s.kind = "wall".into();
        s.total_samples = 2_500_000_000;
        s.processes[0].samples = 1_500_000_000;
        s.processes[1].samples = 1_000_000_000;
        a.set_snapshot(s);
        let lines = screen(&mut a, 120, 20);
        assert!(
            lines[1].contains("time ") && !lines[1].contains("samples 2500000000"),
            "{lines:#?}"
        );
        a.handle_key(key(KeyCode::Tab));
        let lines = screen(&mut a, 120, 20);
        let header = lines.iter().find(|l| l.contains("PID")).expect("header");
        assert!(
            !header.contains("SAMPLES") && header.contains("WALL"),
            "{lines:#?}"
        );
        assert!(
            !lines.iter().any(|l| l.contains("1500000000")),
            "{lines:#?}"
        );
    }

    #[test]
    fn keys_sort_filter_and_views() {
        let mut a = app();
        let names = |a: &App| -> Vec<String> {
            a.function_rows()
                .iter()
                .map(|r| r.qualname.clone())
                .collect()
        };
        assert_eq!(names(&a)[0], "plain_function");
        assert_eq!(a.handle_key(key(KeyCode::Char('n'))), Action::None);
        assert_eq!(names(&a)[0], "Zeta.method");
        a.handle_key(key(KeyCode::Char('t')));
        assert_eq!(a.sort, SortKey::Total);
        a.handle_key(key(KeyCode::Char('o')));
        assert_eq!(names(&a)[0], "plain_function");

        // Filter: typed, applied on Enter, cancelled with Esc.
        a.handle_key(key(KeyCode::Char('/')));
        for c in "SPLIT".chars() {
            a.handle_key(key(KeyCode::Char(c)));
        }
        assert_eq!(names(&a).len(), 4, "not applied while typing");
        a.handle_key(key(KeyCode::Enter));
        assert_eq!(names(&a), ["split_c"]);
        a.handle_key(key(KeyCode::Char('/')));
        a.handle_key(key(KeyCode::Backspace));
        a.handle_key(key(KeyCode::Char('q')));
        a.handle_key(key(KeyCode::Esc));
        assert_eq!(a.filter, "SPLIT", "Esc cancels the edit");
        assert_eq!(a.handle_key(key(KeyCode::Esc)), Action::None);
        assert_eq!(a.filter, "");

        // Level and window ask for a new snapshot.
        assert_eq!(a.handle_key(key(KeyCode::Char('l'))), Action::Refetch);
        assert!(a.query().line_level);
        assert_eq!(a.query().seconds, Some(10));
        assert_eq!(a.handle_key(key(KeyCode::Char('w'))), Action::Refetch);
        assert_eq!(a.query().seconds, None);
        a.handle_key(key(KeyCode::Char(' ')));
        assert!(a.paused);
        a.handle_key(key(KeyCode::Char('p')));
        assert!(!a.paused);

        // Selection moves and is clamped.
        a.handle_key(key(KeyCode::End));
        assert_eq!(a.functions_state.selected(), Some(3));
        a.handle_key(key(KeyCode::Home));
        assert_eq!(a.functions_state.selected(), Some(0));

        // Process view: Enter on the second process filters to it.
        a.handle_key(key(KeyCode::Tab));
        assert_eq!(a.view, View::Processes);
        a.handle_key(key(KeyCode::Down));
        a.handle_key(key(KeyCode::Char('j')));
        assert_eq!(a.processes_state.selected(), Some(1), "clamped");
        assert_eq!(a.handle_key(key(KeyCode::Enter)), Action::Refetch);
        assert_eq!(a.view, View::Functions);
        assert_eq!(a.query().pids, [22]);
        assert_eq!(a.handle_key(key(KeyCode::Esc)), Action::Refetch);
        assert!(a.query().pids.is_empty());

        // Help: any key closes it; q quits, also from the help.
        a.handle_key(key(KeyCode::Char('?')));
        assert!(a.help);
        assert_eq!(a.handle_key(key(KeyCode::Char('x'))), Action::None);
        assert!(!a.help);
        a.handle_key(key(KeyCode::Char('?')));
        assert_eq!(a.handle_key(key(KeyCode::Char('q'))), Action::Quit);
        assert_eq!(a.handle_key(key(KeyCode::Char('q'))), Action::Quit);
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(a.handle_key(ctrl_c), Action::Quit);
        // Ctrl-C quits even while a filter is typed.
        a.handle_key(key(KeyCode::Char('/')));
        assert_eq!(a.handle_key(ctrl_c), Action::Quit);
    }

    #[test]
    fn draws_header_table_and_footer() {
        let mut a = app();
        let lines = screen(&mut a, 160, 12);
        assert!(
            lines[0].starts_with(
                "pyebpf top  mode local  type cpu  rate 99 Hz  samples/s 198  processes 2  drops 0  errors 3"
            ),
            "{lines:#?}"
        );
        assert!(
            lines[1].starts_with("window last 10 s  level function  sort own  samples 1000"),
            "{lines:#?}"
        );
        assert!(
            lines[2].contains("OWN%") && lines[2].contains("SERVICE"),
            "{lines:#?}"
        );
        let top = &lines[3];
        assert!(
            top.starts_with(
                ">   60.0   60.0   6.06s   6.06s plain_function (/srv/app/scenarios.py:10)"
            ),
            "{lines:#?}"
        );
        assert!(top.ends_with("11 python3         3.11   svc11"), "{top}");
        assert!(
            lines[2].ends_with("PID COMMAND         PYTHON SERVICE"),
            "{lines:#?}"
        );
        assert!(lines[11].contains("? help"), "{lines:#?}");

        // Below 110 columns the version goes first; command and service stay.
        let lines = screen(&mut a, 109, 12);
        assert!(
            lines[2].ends_with("PID COMMAND         SERVICE") && !lines[2].contains("PYTHON"),
            "{lines:#?}"
        );
        assert!(lines[3].ends_with("11 python3         svc11"), "{lines:#?}");
        let lines = screen(&mut a, 110, 12);
        assert!(lines[2].contains(" PYTHON "), "{lines:#?}");
        assert!(
            lines[3].ends_with("11 python3         3.11   svc11"),
            "{lines:#?}"
        );

        // Narrower: command and service dropped, the path cut from the left.
        let lines = screen(&mut a, 75, 12);
        assert_eq!(lines[1], "drops 0  errors 3", "whole fields wrap");
        assert!(
            !lines[3].contains("SERVICE") && lines[3].contains("PID"),
            "{lines:#?}"
        );
        assert!(
            lines[4].ends_with("plain_function (…/scenarios.py:10)       11"),
            "{lines:#?}"
        );
        // Narrow: the header wraps whole fields; names stay, locations go.
        let lines = screen(&mut a, 50, 14);
        assert_eq!(
            lines[..4],
            [
                "pyebpf top  mode local  type cpu  rate 99 Hz",
                "samples/s 198  processes 2  drops 0  errors 3",
                "window last 10 s  level function  sort own",
                "samples 1000",
            ],
            "{lines:#?}"
        );
        assert!(!lines[4].contains("PID"), "{lines:#?}");
        assert!(lines[5].ends_with(" plain_function"), "{lines:#?}");
        assert!(
            lines[7].ends_with(" Zeta.method (…/zeta.py:10)"),
            "{lines:#?}"
        );
        assert!(lines.iter().all(|l| width(l) <= 50));

        // Processes view.
        a.handle_key(key(KeyCode::Tab));
        let lines = screen(&mut a, 100, 10);
        assert!(
            lines[2].contains("PID") && lines[2].contains("SAMPLES"),
            "{lines:#?}"
        );
        assert!(
            lines[2].ends_with("COMMAND          PYTHON SERVICE"),
            "{lines:#?}"
        );
        assert!(
            lines[3].starts_with(">       11         600    60.0"),
            "{lines:#?}"
        );
        assert!(
            lines[3].ends_with("python3          3.11   svc11"),
            "{lines:#?}"
        );
        assert!(
            lines[4].contains("22") && lines[4].ends_with("python3          3.14   svc22"),
            "{lines:#?}"
        );
        // Not known (an older daemon): a dash.
        if let Some(s) = a.snapshot.as_mut() {
            s.processes[1].python.clear();
        }
        let lines = screen(&mut a, 100, 10);
        assert!(
            lines[4].ends_with("python3          -      svc22"),
            "{lines:#?}"
        );

        // Paused, filter shown, help overlay, editing prompt.
        a.handle_key(key(KeyCode::Tab));
        a.handle_key(key(KeyCode::Char('p')));
        a.filter = "split".into();
        a.handle_key(key(KeyCode::Char('?')));
        let lines = screen(&mut a, 100, 24);
        assert!(lines[1].contains("filter \"split\"") && lines[1].contains("PAUSED"));
        let all = lines.join("\n");
        assert!(
            all.contains("pyebpf top: keys") && all.contains("q, Ctrl-C"),
            "{all}"
        );
        a.handle_key(key(KeyCode::Esc));
        a.handle_key(key(KeyCode::Char('/')));
        a.handle_key(key(KeyCode::Char('x')));
        let lines = screen(&mut a, 100, 10);
        assert!(lines[9].starts_with("filter: /splitx_"), "{lines:#?}");

        // Errors and empty states.
        let mut b = App::new("daemon http://x".into(), &TopOptions::default());
        let lines = screen(&mut b, 100, 10);
        assert!(
            lines[3].contains("waiting for the first snapshot"),
            "{lines:#?}"
        );
        b.set_error("connection refused".into());
        let lines = screen(&mut b, 100, 10);
        assert_eq!(lines[9], "error: connection refused");
        b.set_snapshot(TopSnapshot::default());
        let lines = screen(&mut b, 100, 10);
        assert!(lines[3].contains("no Python samples yet"), "{lines:#?}");
        // Tiny terminals do not panic.
        for (w, h) in [(1, 1), (10, 3), (20, 2), (0, 0), (200, 1)] {
            let _ = screen(&mut a, w, h);
        }
    }
}
