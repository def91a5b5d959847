//! The app's detail (readiness) page against a real app container: what it says shows in
//! `/status`, and a 503 there (its database is down) never turns `/healthz` unhealthy.

mod support;

use std::process::Command;
use std::time::Duration;

use support::{Agent, Fixture, docker, sh, wait_for};

const LONG: Duration = Duration::from_secs(40);

/// `/cgi-bin/ready`: 503 with a JSON reason while `/state/db-down` exists, else 200. The
/// liveness page `/health` is a static file that does not care.
const READY_CGI: &str = "#!/bin/sh\n\
if [ -e /state/db-down ]; then\n\
  printf 'Status: 503 Service Unavailable\\r\\nContent-Type: application/json\\r\\n\\r\\n'\n\
  printf '{\"ready\": false, \"reason\": \"database unreachable\"}'\n\
else\n\
  printf 'Content-Type: application/json\\r\\n\\r\\n{\"ready\": true}'\n\
fi\n";

/// Build and push `repo:tag` with the readiness page; the fixture removes it when dropped.
fn ready_image(fx: &Fixture, tag: &str) {
    let ctx = fx.dir.path().join(format!("ctx-ready-{tag}"));
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("ready"), READY_CGI).expect("cgi");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {base}\n\
             COPY ready /www/cgi-bin/ready\n\
             RUN mkdir -p /state && chmod +x /www/cgi-bin/ready && echo ok > /www/health && echo release-{tag} > /www/index.html\n\
             CMD [\"/bin/sh\", \"-c\", \"exec httpd -f -p $PORT -h /www\"]\n",
            base = support::BASE_IMAGE
        ),
    )
    .expect("dockerfile");
    let reference = format!("{}:{tag}", fx.repo);
    sh(Command::new("docker")
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "-q", "-t", &reference])
        .arg(&ctx));
    docker(&["push", &reference]);
}

#[test]
fn the_apps_detail_page_shows_in_status_and_a_503_there_never_fails_healthz() {
    let fx = Fixture::new("detail");
    ready_image(&fx, "v1");
    fx.set_release("v1");
    let config = fx.write_config(&fx.file_config("boot", "detail_path = \"/cgi-bin/ready\""));
    let agent = Agent::start(&config, &[]);
    fx.wait_healthy("v1", LONG);
    let id = fx.running_container();
    let detail = |fx: &Fixture| fx.status_or_null()["app_detail"].clone();
    wait_for(
        LONG,
        "the detail page ready",
        || detail(&fx)["status"] == 200 && detail(&fx)["body"]["ready"] == true,
        || format!("{:#}", fx.status_or_null()),
    );
    assert_eq!(detail(&fx)["path"], "/cgi-bin/ready");

    // The database goes away: the app says so on its detail page.
    docker(&["exec", &id, "touch", "/state/db-down"]);
    wait_for(
        LONG,
        "the detail page reporting 503",
        || detail(&fx)["status"] == 503,
        || format!("{:#}", fx.status_or_null()),
    );
    let d = detail(&fx);
    assert_eq!(d["body"]["reason"], "database unreachable", "{d:#}");
    assert_eq!(d["body"]["ready"], false, "{d:#}");
    // Many probe intervals (200 ms) later the host still passes its health check.
    for _ in 0..20 {
        let (code, body) = fx.healthz().expect("healthz");
        assert_eq!((code, body["status"].as_str()), (200, Some("healthy")));
        assert_eq!(detail(&fx)["status"], 503);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(fx.status()["restart_count"], 0);

    // Back: the detail recovers without any restart.
    docker(&["exec", &id, "rm", "/state/db-down"]);
    wait_for(
        LONG,
        "the detail page ready again",
        || detail(&fx)["status"] == 200,
        || format!("{:#}", fx.status_or_null()),
    );
    assert_eq!(fx.running_container(), id);
    assert!(
        agent.logs().contains("app detail status changed"),
        "{}",
        agent.logs()
    );
}
