#!/usr/bin/env bash
# Checks a Jenkinsfile offline, in two passes, with Groovy 2.4 (Debian's `groovy`, the same
# Groovy line Jenkins runs pipelines with):
#   1. syntax: the file compiles as a Groovy script (compiled, not run);
#   2. declarative structure: the script is run against a stand-in for Jenkins' pipeline DSL that
#      records the sections instead of acting: `pipeline` needs `agent` and `stages`, every
#      section, directive and `when` condition must be one Jenkins knows, every stage has exactly
#      one of steps/stages/parallel. Step bodies are compiled (pass 1) but never run.
# It is no substitute for Jenkins' own linter (which needs a Jenkins server and its plugins):
# step names and their arguments are not checked.
#
# Usage: .ci/jenkinsfile-check.sh            check ./Jenkinsfile, then prove the check rejects
#                                             broken copies of it; prints 'N passed, N failed'
#        .ci/jenkinsfile-check.sh FILE...    check these files only
# Exit status: 0 all good, 1 otherwise. Installs groovy with apt when it is missing.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
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

cat >"$work/check.groovy" <<'GROOVY'
// Usage: groovy check.groovy FILE... ; prints "OK FILE" or "ERROR FILE: why" per file and exits
// with the number of files in error.
import org.codehaus.groovy.control.CompilerConfiguration
import org.codehaus.groovy.control.MultipleCompilationErrorsException

class DslError extends RuntimeException {
    DslError(String msg) { super(msg) }
}

// A section of the declarative DSL: which methods may be called in it, and what each does.
class Section {
    String where
    List<String> problems
    Map<String, Object> seen = [:]
    Set<String> allowed
    Map<String, Closure> nested = [:]
    boolean anyMethod = false
    boolean assignments = false

    Section(String where, List<String> problems) {
        this.where = where
        this.problems = problems
    }

    def methodMissing(String name, args) {
        def list = args as List
        if (!anyMethod && !(name in allowed)) {
            problems << "${where}: unknown '${name}' (expected one of: ${allowed.sort().join(', ')})".toString()
            return null
        }
        seen[name] = (seen[name] ?: 0) + 1
        def body = list ? list[-1] : null
        if (nested.containsKey(name)) {
            nested[name].call(list, body instanceof Closure ? body : null)
        }
        return null
    }

    def propertyMissing(String name) {
        // bare words: `agent any`, `env.X`, `currentBuild`, parameters in `when`
        if (name == 'env' || name == 'params' || name == 'currentBuild') return [:].withDefault { '' }
        return name
    }

    def propertyMissing(String name, value) {
        if (!assignments) problems << "${where}: assignment to '${name}' is not allowed here".toString()
        seen[name] = value
    }

    static void run(Closure c, Section s) {
        if (c == null) return
        def copy = c.rehydrate(s, s, s)
        copy.resolveStrategy = Closure.DELEGATE_ONLY
        copy.call()
    }
}

class Dsl {
    List<String> problems = []
    int pipelines = 0

    static final Set<String> PIPELINE = ['agent', 'stages', 'post', 'environment', 'options',
        'parameters', 'triggers', 'tools', 'libraries'] as Set
    static final Set<String> STAGE = ['agent', 'steps', 'stages', 'parallel', 'matrix', 'when',
        'environment', 'options', 'post', 'input', 'tools', 'failFast'] as Set
    static final Set<String> POST = ['always', 'changed', 'fixed', 'regression', 'aborted',
        'failure', 'success', 'unstable', 'unsuccessful', 'cleanup', 'notBuilt'] as Set
    static final Set<String> WHEN = ['branch', 'buildingTag', 'changelog', 'changeset',
        'changeRequest', 'environment', 'equals', 'expression', 'tag', 'not', 'allOf', 'anyOf',
        'triggeredBy', 'beforeAgent', 'beforeInput', 'beforeOptions'] as Set
    static final Set<String> AGENT = ['any', 'none', 'label', 'node', 'docker', 'dockerfile',
        'kubernetes'] as Set

    Section section(String where, Set<String> allowed) {
        def s = new Section(where, problems)
        s.allowed = allowed
        return s
    }

    void pipeline(Closure body) {
        pipelines++
        def p = section('pipeline', PIPELINE)
        p.nested.agent = { args, c -> agent('pipeline', args, c) }
        p.nested.stages = { args, c -> stages('pipeline.stages', c) }
        p.nested.post = { args, c -> post('pipeline.post', c) }
        p.nested.environment = { args, c -> environment('pipeline.environment', c) }
        p.nested.options = { args, c -> opaque('pipeline.options', c) }
        Section.run(body, p)
        ['agent', 'stages'].each { if (!p.seen[it]) problems << "pipeline: no '${it}' section".toString() }
        p.seen.each { k, n -> if (n > 1) problems << "pipeline: '${k}' appears ${n} times".toString() }
    }

    void agent(String where, List args, Closure c) {
        if (c == null) {
            def word = args ? args[0] : null
            if (!(word in ['any', 'none'])) problems << "${where}: agent must be any, none or a block".toString()
            return
        }
        def a = section("${where}.agent", AGENT)
        a.anyMethod = true  // agent blocks take plugin-specific options
        Section.run(c, a)
    }

    void stages(String where, Closure c) {
        def s = section(where, ['stage'] as Set)
        int count = 0
        s.nested.stage = { args, body ->
            count++
            def name = args && args[0] instanceof CharSequence ? args[0].toString() : null
            if (!name) problems << "${where}: a stage without a name".toString()
            stage("${where}['${name}']", body)
        }
        Section.run(c, s)
        if (count == 0) problems << "${where}: no stage".toString()
    }

    void stage(String where, Closure c) {
        def st = section(where, STAGE)
        st.nested.when = { args, body -> when("${where}.when", body) }
        st.nested.stages = { args, body -> stages("${where}.stages", body) }
        st.nested.parallel = { args, body -> stages("${where}.parallel", body) }
        st.nested.post = { args, body -> post("${where}.post", body) }
        st.nested.environment = { args, body -> environment("${where}.environment", body) }
        st.nested.agent = { args, body -> agent(where, args, body) }
        // steps, options, input, tools: their bodies are Jenkins steps and options, not run here
        Section.run(c, st)
        def kinds = ['steps', 'stages', 'parallel', 'matrix'].findAll { st.seen[it] }
        if (kinds.size() != 1) {
            problems << "${where}: needs exactly one of steps, stages, parallel, matrix (has ${kinds ?: 'none'})".toString()
        }
        st.seen.each { k, n -> if (n > 1) problems << "${where}: '${k}' appears ${n} times".toString() }
    }

    void when(String where, Closure c) {
        def w = section(where, WHEN)
        ['not', 'allOf', 'anyOf'].each { op -> w.nested[op] = { args, body -> when("${where}.${op}", body) } }
        Section.run(c, w)
        if (w.seen.findAll { k, v -> !k.startsWith('before') }.isEmpty()) {
            problems << "${where}: no condition".toString()
        }
    }

    void post(String where, Closure c) {
        def p = section(where, POST)
        Section.run(c, p)
    }

    void environment(String where, Closure c) {
        def e = section(where, [] as Set)
        e.assignments = true
        e.anyMethod = true  // credentials('id') and the like
        Section.run(c, e)
    }

    void opaque(String where, Closure c) {
        def o = section(where, [] as Set)
        o.anyMethod = true
        Section.run(c, o)
    }
}

abstract class JenkinsfileScript extends Script {
    def pipeline(Closure body) { binding.getVariable('skiffDsl').pipeline(body) }
}

int bad = 0
for (path in args) {
    def file = new File(path)
    def dsl = new Dsl()
    def config = new CompilerConfiguration()
    config.scriptBaseClass = JenkinsfileScript.name
    def shell = new GroovyShell(this.class.classLoader, new Binding([skiffDsl: dsl]), config)
    try {
        def script = shell.parse(file.text, 'Jenkinsfile')   // pass 1: compile
        script.run()                                        // pass 2: the declarative structure
        if (dsl.pipelines != 1) dsl.problems << "expected one pipeline { } block, found ${dsl.pipelines}".toString()
    } catch (MultipleCompilationErrorsException e) {
        dsl.problems << ("syntax error:\n" + e.message.readLines().findAll { it.trim() }.collect { '    ' + it }.join('\n'))
    } catch (Throwable e) {
        dsl.problems << "the pipeline could not be read: ${e.class.simpleName}: ${e.message}".toString()
    }
    if (dsl.problems) {
        bad++
        println "ERROR ${path}:"
        dsl.problems.each { println "  - ${it}" }
    } else {
        println "OK ${path}"
    }
}
System.exit(bad)
GROOVY

check() { groovy "$work/check.groovy" "$@"; }

if (($#)); then
  check "$@"
  exit $?
fi

jf="$root/Jenkinsfile"
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
for f in "$work"/broken/*; do
  cmp -s "$f" "$jf" && { say "could not make the broken copy $(basename "$f")"; exit 1; }
done

start=$SECONDS
set +e
check "$jf" "$work"/broken/* >"$work/out" 2>&1
set -e
sed 's/^/    /' "$work/out"
rc=0; grep -qx "OK $jf" "$work/out" || rc=1
result "$rc" "Jenkinsfile passes the syntax and declarative checks"
for f in "$work"/broken/*; do
  rc=0; grep -q "^ERROR $f:" "$work/out" || rc=1
  result "$rc" "a broken copy is rejected: $(basename "$f")"
done
say "checked in $((SECONDS - start)) s (groovy $(groovy --version 2>/dev/null | awk '{print $3}'))"
echo "jenkinsfile: $passed passed, $failed failed"
[ "$failed" = 0 ]
