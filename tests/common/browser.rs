//! A real headless Chromium driven over the W3C WebDriver protocol (Debian's `chromium` and
//! `chromium-driver`, installed by `.ci/run`), with plain HTTP calls to `chromedriver`: no
//! extra crate, no mock browser.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A running `chromedriver`; each [`Browser`] is one Chromium with its own profile.
pub struct Driver {
    child: Child,
    url: String,
    http: reqwest::Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn which(bin: &str) -> Option<String> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| format!("{d}/{bin}"))
        .find(|p| std::path::Path::new(p).exists())
}

impl Driver {
    pub async fn start() -> Driver {
        let bin = which("chromedriver").expect("chromedriver not found: apt-get install chromium chromium-driver");
        let port = raftchat::fixture::free_port().unwrap();
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let d = Driver { child, url: format!("http://127.0.0.1:{port}"), http: reqwest::Client::new() };
        let end = Instant::now() + Duration::from_secs(20);
        while d.http.get(format!("{}/status", d.url)).send().await.is_err() {
            assert!(Instant::now() < end, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        d
    }

    /// A new headless Chromium window (a profile of its own: its own localStorage).
    pub async fn browser(&self) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let chromium = which("chromium").or_else(|| which("chromium-browser")).expect("chromium not found");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1200,900", format!("--user-data-dir={}", profile.path().display())]
            }
        }}});
        let v: Value =
            self.http.post(format!("{}/session", self.url)).json(&caps).send().await.unwrap().json().await.unwrap();
        let id = v["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {v}")).to_string();
        Browser { base: format!("{}/session/{id}", self.url), http: self.http.clone(), _profile: profile }
    }
}

pub struct Browser {
    base: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn cmd(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let req = self.http.request(method, format!("{}{path}", self.base));
        let req = if body.is_null() { req } else { req.json(&body) };
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        if v["value"].get("error").is_some() {
            panic!("webdriver {path}: {}", v["value"]);
        }
        v["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", json!({ "url": url })).await;
    }

    pub async fn find(&self, css: &str) -> String {
        let v = self.cmd(reqwest::Method::POST, "/element", json!({"using": "css selector", "value": css})).await;
        v[ELEMENT].as_str().unwrap().to_string()
    }

    pub async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd(reqwest::Method::POST, &format!("/element/{e}/click"), json!({})).await;
    }

    /// Types `text` into the element (keyboard events, as a person would).
    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd(reqwest::Method::POST, &format!("/element/{e}/clear"), json!({})).await;
        self.cmd(reqwest::Method::POST, &format!("/element/{e}/value"), json!({ "text": text })).await;
    }

    /// Presses keys (W3C key codes, e.g. "\u{E007}" for Enter) on the focused element.
    pub async fn keys(&self, keys: &str) {
        let actions: Vec<Value> = keys
            .chars()
            .flat_map(|k| {
                [json!({"type": "keyDown", "value": k.to_string()}), json!({"type": "keyUp", "value": k.to_string()})]
            })
            .collect();
        let all = json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]});
        self.cmd(reqwest::Method::POST, "/actions", all).await;
        self.cmd(reqwest::Method::DELETE, "/actions", Value::Null).await;
    }

    /// Resizes the window (a phone's width, say).
    pub async fn window_size(&self, width: u32, height: u32) {
        self.cmd(reqwest::Method::POST, "/window/rect", json!({"width": width, "height": height})).await;
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its result.
    pub async fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(reqwest::Method::POST, "/execute/sync", json!({ "script": script, "args": args })).await
    }

    /// The `textContent` of the first element matching `css` ("" if none).
    pub async fn text(&self, css: &str) -> String {
        let v = self
            .js("const e = document.querySelector(arguments[0]); return e ? e.textContent : '';", json!([css]))
            .await;
        v.as_str().unwrap_or_default().to_string()
    }

    /// Waits until `script` (a function body) returns something truthy; returns it.
    pub async fn wait_for(&self, what: &str, script: &str, args: Value, within: Duration) -> Value {
        let end = Instant::now() + within;
        loop {
            let v = self.js(script, args.clone()).await;
            let truthy = !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0));
            if truthy {
                return v;
            }
            if Instant::now() > end {
                let state = self.text("#conn-state").await;
                let body = self.js("return document.body.innerText.slice(0, 3000);", json!([])).await;
                panic!("waited {within:?} for {what}; connection: {state}; page:\n{}", body.as_str().unwrap_or(""));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the element matching `css` contains `needle` in its text.
    pub async fn wait_text(&self, css: &str, needle: &str, within: Duration) {
        let what = format!("{css} to contain {needle:?}");
        self.wait_for(
            &what,
            "const e = document.querySelector(arguments[0]); return !!e && e.textContent.includes(arguments[1]);",
            json!([css, needle]),
            within,
        )
        .await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Close the window even when a test fails half-way (a blocking client on a thread of
        // its own, as this may run inside the test's runtime).
        let base = self.base.clone();
        let _ = std::thread::spawn(move || {
            let _ = reqwest::blocking::Client::new().delete(&base).timeout(Duration::from_secs(5)).send();
        })
        .join();
    }
}
