#!/usr/bin/env bash
# Checks the Jenkinsfiles offline, in three passes, with Groovy 2.4 (Debian's `groovy`, the same
# Groovy line Jenkins runs pipelines with):
#   1. syntax: the file compiles as a Groovy script (compiled, not run);
#   2. declarative structure: the script is run against a stand-in for Jenkins' pipeline DSL that
#      records the sections instead of acting: `pipeline` needs `agent` and `stages`, every
#      section, directive and `when` condition must be one Jenkins knows, every stage has exactly
#      one of steps/stages/parallel. Step bodies are compiled (pass 1) but never run.
#   3. the paths: the pipeline is run against a model of Jenkins for each scenario (a pull request,
#      a branch and master with and without a stack, a failed, a refused, a locked release, the
#      teardown job with a good, an empty and a hostile branch name, a failed sign, a KMS key):
#      `when` conditions evaluated,
#      step bodies and the Jenkinsfile's functions run with recording stand-ins for sh,
#      withCredentials, error, unstable, readFile...; the make targets each path calls, in order,
#      and the build's result must be the expected ones, and no path calls ctl or aws directly;
#      every path that releases signs first, after the push, with the signing credential
#      (issue 20), and a failed sign ends the build before any release.
#      `make -s env-name` is answered by the real Makefile: a branch folding onto a protected
#      environment (Master, master_, Production...) must stop there (issue 18, finding 5).
# It is no substitute for Jenkins' own linter (which needs a Jenkins server and its plugins):
# step names and their arguments are not checked, and the model knows only the steps used here.
# The stand-in and the model are Groovy, in JenkinsfileModel.groovy beside this script.
#
# Usage: testbed/checks/jenkinsfile-check.sh            check ./Jenkinsfile and ./Jenkinsfile.teardown, then
#                                             prove the checks reject broken copies; prints
#                                             'N passed, N failed'
#        testbed/checks/jenkinsfile-check.sh FILE...    passes 1 and 2 on these files only
# Exit status: 0 all good, 1 otherwise. Installs groovy with apt when it is missing.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
say() { printf '[jenkinsfile] %s\n' "$*"; }

if ! command -v groovy >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || { say "groovy is missing; install it (apt-get install groovy) or run as root"; exit 1; }
  say "installing groovy (Debian package)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends groovy >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends groovy >/dev/null; }
fi
# Debian's groovy looks for /usr/lib/jvm/default-java, which only default-jre provides.
if [ -z "${JAVA_HOME:-}" ] || [ ! -x "$JAVA_HOME/bin/java" ]; then
  java=$(command -v java) || { say "no java on PATH for groovy"; exit 1; }
  JAVA_HOME=$(dirname "$(dirname "$(readlink -f "$java")")")
  export JAVA_HOME
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

check() { SKIFF_MAKE_DIR=$root groovy "$here/JenkinsfileModel.groovy" "$@"; }

if (($#)); then
  check "$@"
  exit $?
fi

jf="$root/Jenkinsfile"
td="$root/Jenkinsfile.teardown"
passed=0
failed=0
result() { # ok?, name
  if [ "$1" = 0 ]; then passed=$((passed + 1)); say "ok   $2"; else failed=$((failed + 1)); say "FAIL $2"; fi
}

# Broken copies, each of which the check must reject.
mkdir -p "$work/broken"
python3 - "$jf" "$work/broken" <<'PY'
import sys
text, out = open(sys.argv[1]).read(), sys.argv[2]
def write(name, broken):
    with open(f"{out}/{name}", "w") as f:
        f.write(broken)
# a syntax error: the pipeline's closing brace is gone
write("unbalanced", text[: text.rindex("}")])
# a misspelled directive in the first stage with steps
i = text.index("steps {")
write("misspelled-steps", text[:i] + "stepz {" + text[i + len("steps {"):])
# a `when` condition Jenkins does not have
write("unknown-when", text.replace("changeRequest()", "pullRequest()", 1))
# no stages at all
write("no-stages", text[: text.index("    stages {")] + text[text.index("    post {"):])
PY
# Copies whose paths are wrong though their structure is fine, each of which pass 3 must reject.
mkdir -p "$work/paths-main" "$work/paths-teardown"
python3 - "$jf" "$td" "$work" <<'PY'
import sys
main, teardown, out = open(sys.argv[1]).read(), open(sys.argv[2]).read(), sys.argv[3]
def write(name, text, old, new):
    assert old in text, f"{name}: {old!r} not found"
    with open(f"{out}/{name}", "w") as f:
        f.write(text.replace(old, new, 1))
# the branch path no longer runs the integration checks
write("paths-main/integration-not-run", main, "sh make('integration", "echo make('integration")
# the stack created by aws directly instead of make create-stack
write("paths-main/create-by-aws", main, "sh make('create-stack')",
      "sh 'aws cloudformation deploy --template-file templates/app.yaml --stack-name app-x'")
# ctl called directly instead of make update-stack
write("paths-main/ctl-direct", main, "make('update-stack TAG=\"$GIT_COMMIT\" ",
      "('\"$CARGO_TARGET_DIR/release/ctl\" release --tag \"$GIT_COMMIT\" ")
# the teardown asks (no FORCE=1): it would hang or refuse in Jenkins
write("paths-teardown/no-force", teardown, "FORCE=1 ", "")
# the environment sanitized in Groovy instead of asked of make (Master would reach master)
write("paths-main/env-in-groovy", main, "sh(script: 'make -s env-name', returnStdout: true).trim()",
      "env.BRANCH_NAME.toLowerCase().replaceAll(/[^a-z0-9]+/, '-')")
# any branch name goes through to the shell
write("paths-teardown/no-validation", teardown, "if (!(branch ==~", "if (false && !(branch ==~")
# issue 20: the image released unsigned (no sign step), and a failed sign that does not stop the
# release
write("paths-main/no-sign", main, "sh 'make sign SIGNING_KEY=", "echo 'make sign SIGNING_KEY=")
write("paths-main/sign-failure-ignored", main, "sh 'make sign SIGNING_KEY=\"$SIGNING_KEY\"'",
      "sh(script: 'make sign SIGNING_KEY=\"$SIGNING_KEY\"', returnStatus: true)")
# the sign step after the release
write("paths-main/sign-after-deploy", main.replace("stage('Sign')", "stage('Signx')", 1)
      .replace("stage('Integration')", "stage('Sign') {\n when { not { changeRequest() } }\n steps { withCredentials([file(credentialsId: 'skiff-signing-key', variable: 'SIGNING_KEY')]) { sh 'make sign SIGNING_KEY=\"$SIGNING_KEY\"' } }\n }\n        stage('Integration')", 1),
      "stage('Signx') {\n            when {\n                not {\n                    changeRequest()", "stage('Signx') {\n            when {\n                not {\n                    not { changeRequest() }")
PY

start=$SECONDS
set +e
check "$jf" "$td" "$work"/broken/* >"$work/out" 2>&1
set -e
sed 's/^/    /' "$work/out"
for f in "$jf" "$td"; do
  rc=0; grep -qx "OK $f" "$work/out" || rc=1
  result "$rc" "$(basename "$f") passes the syntax and declarative checks"
done
for f in "$work"/broken/*; do
  rc=0; grep -q "^ERROR $f:" "$work/out" || rc=1
  result "$rc" "a broken copy is rejected: $(basename "$f")"
done

# Pass 3: each path run against the model of Jenkins (scenarios in check.groovy, scenarioSets).
for kind in main teardown; do
  file=$jf; [ "$kind" = main ] || file=$td
  set +e
  check --paths "$kind" "$file" "$work/paths-$kind"/* >"$work/paths-$kind.out" 2>&1
  set -e
  sed 's/^/    /' "$work/paths-$kind.out"
  rc=0
  grep -q "^ok   path $file: " "$work/paths-$kind.out" || rc=1
  ! grep -q "^FAIL path $file:" "$work/paths-$kind.out" || rc=1
  result "$rc" "$(basename "$file"): every $kind path calls the Makefile targets it should"
  for f in "$work/paths-$kind"/*; do
    rc=0; grep -q "^FAIL path $f:" "$work/paths-$kind.out" || rc=1
    result "$rc" "a copy with a wrong $kind path is rejected: $(basename "$f")"
  done
done
say "checked in $((SECONDS - start)) s (groovy $(groovy --version 2>/dev/null | awk '{print $3}'))"
echo "jenkinsfile: $passed passed, $failed failed"
[ "$failed" = 0 ]
