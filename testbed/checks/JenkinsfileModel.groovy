// Usage: groovy JenkinsfileModel.groovy FILE... ; prints "OK FILE" or "ERROR FILE: why" per file and exits
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
    List<Map> stageList = []  // the top-level stages in order: name, when and steps closures

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
            def rec = stage("${where}['${name}']", body)
            if (where == 'pipeline.stages') { rec.name = name; stageList << rec }
        }
        Section.run(c, s)
        if (count == 0) problems << "${where}: no stage".toString()
    }

    Map stage(String where, Closure c) {
        def st = section(where, STAGE)
        def rec = [:]
        st.nested.when = { args, body -> rec.when = body; when("${where}.when", body) }
        st.nested.steps = { args, body -> rec.steps = body }
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
        return rec
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

// --- pass 3 (--paths): which Makefile targets each path of the pipeline calls ---------------------
// The pipeline read by pass 2 is run stage by stage against a model of Jenkins for a scenario (a
// branch, a pull request, the teardown job; what `sh` answers): `when` conditions are evaluated,
// step bodies run with recording stand-ins for sh, withCredentials, error, unstable, readFile...,
// and the Jenkinsfile's own functions run as written. What comes out is every shell command in
// order, from which the make targets are read, and the build's result.
class StopBuild extends RuntimeException {
    StopBuild(String msg) { super(msg) }
}

class Scenario {
    String name
    Map env = [:]
    Map params = [:]
    List<List> answers = []  // [regex, exit status, stdout] for sh scripts that match
    Map files = [:]
    // what the run did
    List<Map> commands = []   // script, env (withEnv), credentials in effect
    List<String> stagesRun = []
    List<String> credentials = []
    List<String> messages = []
    String result = 'SUCCESS'

    List answer(String script) {
        // `make -s env-name` is answered by the real Makefile (SKIFF_MAKE_DIR) for the branch, so
        // that the paths follow the one definition of a branch's environment, refusals included.
        String dir = System.getenv('SKIFF_MAKE_DIR')
        if (dir && script =~ /(?:^|&&\s*)make\s+-s\s+env-name\s*$/) {
            def proc = ['make', '-s', '-C', dir, 'env-name'].execute(
                ["PATH=${System.getenv('PATH')}", "BRANCH_NAME=${env.BRANCH_NAME ?: ''}"], new File(dir))
            def out = new StringBuilder(), err = new StringBuilder()
            proc.waitForProcessOutput(out, err)
            if (proc.exitValue() != 0) messages << err.toString().trim()
            return [null, proc.exitValue(), out.toString()]
        }
        def a = answers.find { script =~ it[0] }
        return a ?: [null, 0, '']
    }

    List<String> targets() {
        commands.collectMany { c ->
            def m = c.script =~ /(?:^|&&\s*|;\s*|\|\|\s*)make\s+(?:-\S+\s+)*([a-z][a-z-]*)/
            m.collect { it[1] }
        }
    }

    Map command(String target) {
        commands.find { c -> c.script =~ /(?:^|&&\s*|;\s*)make\s+(?:-\S+\s+)*${target}(\s|$)/ }
    }
}

class WhenEval {
    Scenario sc
    List<Boolean> results = []

    boolean all() { results.every { it } }
    WhenEval sub(Closure c) { def w = new WhenEval(sc: sc); Sim.run(c, w); w }
    static boolean glob(String pattern, String value) {
        value ==~ pattern.collect { ch -> ch == '*' ? '.*' : java.util.regex.Pattern.quote(ch) }.join('')
    }
    def branch(String pattern) { results << glob(pattern, (sc.env.BRANCH_NAME ?: '').toString()) }
    def changeRequest(Map m = [:]) { results << (sc.env.CHANGE_ID ? true : false) }
    def not(Closure c) { results << !sub(c).all() }
    def allOf(Closure c) { results << sub(c).all() }
    def anyOf(Closure c) { results << sub(c).results.any { it } }
    def environment(Map m) { results << (sc.env[m.name]?.toString() == m.value?.toString()) }
    def expression(Closure c) { results << (Sim.run(c, new StepsSim(sc: sc)) as boolean) }
    def beforeAgent(boolean b) {}
    def methodMissing(String name, args) { throw new StopBuild("when: '${name}' cannot be evaluated here") }
    def propertyMissing(String name) {
        if (name == 'env') return sc.env
        if (name == 'params') return sc.params
        throw new StopBuild("when: unknown '${name}'")
    }
}

class StepsSim {
    Scenario sc
    Script script
    List<String> withEnvs = []

    def sh(String s) { doSh([script: s]) }
    def sh(Map m) { doSh(m) }
    def doSh(Map m) {
        String s = m.script.toString()
        sc.commands << [script: s, env: withEnvs.clone(), credentials: sc.credentials.clone()]
        def a = sc.answer(s)
        if (m.returnStatus) return a[1]
        if (a[1] != 0) throw new StopBuild("sh exited ${a[1]}: ${s}")
        return m.returnStdout ? a[2] : null
    }
    def error(String msg) { throw new StopBuild(msg) }
    def unstable(String msg) { if (sc.result == 'SUCCESS') sc.result = 'UNSTABLE'; sc.messages << msg }
    def echo(String msg) { sc.messages << msg }
    def fileExists(String p) { sc.files.containsKey(p) }
    def readFile(String p) {
        if (!sc.files.containsKey(p)) throw new StopBuild("readFile: no ${p}")
        sc.files[p]
    }
    def file(Map m) { sc.credentials << m.credentialsId.toString(); null }
    def string(Map m) { sc.credentials << m.credentialsId.toString(); null }
    def withEnv(List vars, Closure c) {
        def saved = withEnvs.clone()
        withEnvs.addAll(vars.collect { it.toString() })
        try { c.call() } finally { withEnvs = saved }
    }
    def methodMissing(String name, args) {
        def list = args as List
        if (script.metaClass.respondsTo(script, name)) return script.invokeMethod(name, args)
        // script, withCredentials, timeout, input, dir, ...: run the body when there is one
        def body = list ? list[-1] : null
        return body instanceof Closure ? body.call() : null
    }
    def propertyMissing(String name) {
        if (name == 'env') return sc.env
        if (name == 'params') return sc.params
        if (name == 'currentBuild') return [result: sc.result]
        throw new StopBuild("steps: unknown '${name}'")
    }
}

class Sim {
    static def run(Closure c, Object delegate) {
        def copy = c.rehydrate(delegate, c.owner, c.thisObject)
        copy.resolveStrategy = Closure.DELEGATE_FIRST
        return copy.call()
    }

    // Runs the recorded stages for a scenario, as declarative Jenkins does: a stage whose `when`
    // is false is skipped; after a failed stage the others are skipped.
    static void play(List<Map> stageList, Scenario sc, Script script, Binding binding) {
        def steps = new StepsSim(sc: sc, script: script)
        binding.setVariable('skiffSim', steps)
        binding.setVariable('env', sc.env)
        binding.setVariable('params', sc.params)
        for (st in stageList) {
            if (sc.result == 'FAILURE') break
            try {
                if (st.when != null && !new WhenEval(sc: sc).with { w -> run(st.when, w); w.all() }) continue
                sc.stagesRun << st.name
                if (st.steps != null) run(st.steps, steps)
            } catch (StopBuild e) {
                sc.result = 'FAILURE'
                sc.messages << e.message
            }
        }
    }
}

// The scenarios and what each path must do.
Map<String, List<Map>> scenarioSets() {
    def commit = '0123456789abcdef0123456789abcdef01234567'
    def base = { Map extra -> [GIT_COMMIT: commit, BUILD_URL: 'https://jenkins/job/1/'] + extra }
    def built = ['env-name', 'build', 'test', 'push']
    // every branch that is not a pull request signs what it pushed before anything is released
    def signed = built + ['sign']
    // issue 18, finding 5: a branch folding onto a protected environment stops at make env-name
    def refused = { String branch ->
        [name: "branch ${branch}: refused by make env-name, nothing built, pushed or deployed".toString(),
            env: base(BRANCH_NAME: branch), answers: [[/stack-status/, 0, 'UPDATE_COMPLETE\n']],
            targets: ['env-name'], result: 'FAILURE', env_name: null]
    }
    return [
        main: [
            [name: 'pull request (the PR gate only)', env: base(BRANCH_NAME: 'PR-42', CHANGE_ID: '42',
                CHANGE_AUTHOR: 'skiff-maintainer'), targets: built, result: 'SUCCESS'],
            [name: 'branch feature/login, no stack yet: created, then tested', env: base(BRANCH_NAME: 'feature/login'),
                answers: [[/stack-status/, 0, 'NONE\n']],
                targets: signed + ['stack-status', 'create-stack', 'integration'], result: 'SUCCESS',
                credential: 'skiff-stack-branch', wait: '900'],
            [name: 'branch feature/login, stack exists: released, then tested', env: base(BRANCH_NAME: 'feature/login'),
                answers: [[/stack-status/, 0, 'UPDATE_COMPLETE\n']],
                targets: signed + ['stack-status', 'update-stack', 'integration'], result: 'SUCCESS',
                credential: 'skiff-stack-branch', wait: '120'],
            [name: 'master, stack exists: released, then tested', env: base(BRANCH_NAME: 'master'),
                answers: [[/stack-status/, 0, 'UPDATE_COMPLETE\n']],
                targets: signed + ['stack-status', 'update-stack', 'integration'], result: 'SUCCESS',
                credential: 'skiff-stack-master', wait: '120'],
            [name: 'master, no stack yet: created, then tested', env: base(BRANCH_NAME: 'master'),
                answers: [[/stack-status/, 0, 'NONE\n']],
                targets: signed + ['stack-status', 'create-stack', 'integration'], result: 'SUCCESS',
                credential: 'skiff-stack-master', wait: '900'],
            [name: 'master, the release fails its health checks (ctl 1): FAILURE, not tested', env: base(BRANCH_NAME: 'master'),
                answers: [[/stack-status/, 0, 'UPDATE_COMPLETE\n'], [/update-stack/, 2, '']], files: ['.ctl-exit': '1\n'],
                targets: signed + ['stack-status', 'update-stack'], result: 'FAILURE'],
            [name: 'master, another release holds the lock (ctl 4): UNSTABLE, not tested', env: base(BRANCH_NAME: 'master'),
                answers: [[/stack-status/, 0, 'UPDATE_COMPLETE\n'], [/update-stack/, 2, '']], files: ['.ctl-exit': '4\n'],
                targets: signed + ['stack-status', 'update-stack'], result: 'UNSTABLE'],
            refused('Master'), refused('MASTER'), refused('master_'), refused('-master'), refused('Production'),
            [name: 'branch feature/login: its own environment, not feature-login\'s', env: base(BRANCH_NAME: 'feature/login'),
                answers: [[/stack-status/, 0, 'UPDATE_COMPLETE\n']],
                targets: signed + ['stack-status', 'update-stack', 'integration'], result: 'SUCCESS',
                credential: 'skiff-stack-branch', env_name: 'feature-login--df7c7a'],
            [name: 'branch master: the environment master', env: base(BRANCH_NAME: 'master'),
                answers: [[/stack-status/, 0, 'UPDATE_COMPLETE\n']],
                targets: signed + ['stack-status', 'update-stack', 'integration'], result: 'SUCCESS',
                credential: 'skiff-stack-master', env_name: 'master'],
            [name: 'branch whose stack is being updated: FAILURE, nothing deployed', env: base(BRANCH_NAME: 'feature/login'),
                answers: [[/stack-status/, 0, 'UPDATE_IN_PROGRESS\n']],
                targets: signed + ['stack-status'], result: 'FAILURE'],
            [name: 'the sign step fails: FAILURE, nothing released', env: base(BRANCH_NAME: 'feature/login'),
                answers: [[/make sign/, 2, ''], [/stack-status/, 0, 'UPDATE_COMPLETE\n']],
                targets: signed, result: 'FAILURE'],
            [name: 'master with SIGNING_KMS_KEY: signed with the KMS key, then released', env: base(BRANCH_NAME: 'master',
                SIGNING_KMS_KEY: 'alias/skiff-signing'), answers: [[/stack-status/, 0, 'UPDATE_COMPLETE\n']],
                targets: signed + ['stack-status', 'update-stack', 'integration'], result: 'SUCCESS',
                credential: 'skiff-stack-master', kms: true],
            [name: 'the integration checks fail: FAILURE', env: base(BRANCH_NAME: 'feature/login'),
                answers: [[/stack-status/, 0, 'UPDATE_COMPLETE\n'], [/integration/, 2, '']],
                targets: signed + ['stack-status', 'update-stack', 'integration'], result: 'FAILURE'],
        ],
        teardown: [
            [name: 'teardown of feature/login', env: base([:]), params: [BRANCH: 'feature/login'],
                targets: ['delete-stack'], result: 'SUCCESS', force: 'feature/login'],
            [name: 'teardown without a branch: refused', env: base([:]), params: [BRANCH: ''],
                targets: [], result: 'FAILURE'],
            [name: 'teardown of a branch name with shell characters: refused', env: base([:]),
                params: [BRANCH: "x';rm -rf /;'"], targets: [], result: 'FAILURE'],
        ],
    ]
}

// Returns the problems of one scenario's run.
List<String> judge(Map want, Scenario sc) {
    def problems = []
    def got = sc.targets()
    if (got != want.targets) problems << "make targets ${got}, expected ${want.targets}".toString()
    if (sc.result != want.result) {
        problems << "result ${sc.result}, expected ${want.result} (${sc.messages ? sc.messages[-1] : 'no message'})".toString()
    }
    sc.commands.each { c ->
        if (c.script =~ /\bctl"?\s+(?:--?\S+\s+)*(release|rollback)\b/ || c.script =~ /\baws\s+(cloudformation|ssm|logs|rds|ecr)\b/) {
            problems << "calls ctl or aws directly instead of a Makefile target: ${c.script}".toString()
        }
    }
    if (want.credential) {
        ['create-stack', 'update-stack', 'integration'].findAll { it in got }.each { t ->
            def c = sc.command(t)
            if (!(want.credential in c.credentials) || !(c.script.contains('STACK_CONFIG'))) {
                problems << "${t} does not run with the stack config ${want.credential}: ${c.script}".toString()
            }
        }
    }
    // issue 20: nothing is released unsigned. The sign step runs after the push and before any
    // release (create-stack writes the first one), with the signing credential.
    def releases = got.findIndexOf { it in ['create-stack', 'update-stack'] }
    if (releases >= 0 && !('sign' in got[0..<releases])) {
        problems << "releases (${got[releases]}) without signing first: ${got}".toString()
    }
    if ('sign' in got) {
        if (!('push' in got) || got.indexOf('sign') < got.indexOf('push')) {
            problems << "signs before the push: ${got}".toString()
        }
        def c = sc.command('sign')
        def (credential, variable) = want.kms ? ['skiff-signing-public-key', 'SIGNING_KMS_KEY="$SIGNING_KMS_KEY"'] :
            ['skiff-signing-key', 'SIGNING_KEY="$SIGNING_KEY"']
        if (!(credential in c.credentials) || !c.script.contains(variable)) {
            problems << "sign does not run with ${credential} and ${variable}: ${c.script}".toString()
        }
    }
    if (want.containsKey('env_name') && sc.env.SKIFF_ENV != want.env_name) {
        problems << "environment ${sc.env.SKIFF_ENV}, expected ${want.env_name}".toString()
    }
    if ('update-stack' in got && !(sc.command('update-stack').script =~ 'TAG="?\\$GIT_COMMIT')) {
        problems << "update-stack does not release \$GIT_COMMIT: ${sc.command('update-stack').script}".toString()
    }
    if ('integration' in got) {
        def c = sc.command('integration').script
        if (!(c =~ 'EXPECT_TAG="?\\$GIT_COMMIT')) problems << "integration does not expect \$GIT_COMMIT: ${c}".toString()
        if (want.wait && sc.env.INTEGRATION_WAIT != want.wait) {
            problems << "integration waits ${sc.env.INTEGRATION_WAIT} s, expected ${want.wait}".toString()
        }
    }
    if (want.force) {
        def c = sc.command('delete-stack')
        if (!c || !(c.script =~ /\bFORCE=1\b/) || !("BRANCH=${want.force}".toString() in c.env) || !c.script.contains('BRANCH="$BRANCH"')) {
            problems << "delete-stack is not run with FORCE=1 for BRANCH=${want.force}: ${c}".toString()
        }
    }
    return problems
}

abstract class JenkinsfileScript extends Script {
    def pipeline(Closure body) { binding.getVariable('skiffDsl').pipeline(body) }
    // Jenkins steps called from the Jenkinsfile's own functions: the model's, in pass 3.
    def methodMissing(String name, args) {
        if (binding.hasVariable('skiffSim')) return binding.getVariable('skiffSim').invokeMethod(name, args)
        throw new MissingMethodException(name, getClass(), args as Object[])
    }
}

int bad = 0
if (args && args[0] == '--paths') {
    // --paths KIND FILE...: the scenarios of KIND (main, teardown) against each FILE; prints
    // "ok   path FILE: scenario: targets" or "FAIL path FILE: scenario: problems" per scenario.
    def scenarios = scenarioSets()[args[1]]
    if (scenarios == null) { println "unknown scenario set ${args[1]}"; System.exit(99) }
    for (path in args.drop(2)) {
        def dsl = new Dsl()
        def config = new CompilerConfiguration()
        config.scriptBaseClass = JenkinsfileScript.name
        def binding = new Binding([skiffDsl: dsl])
        def shell = new GroovyShell(this.class.classLoader, binding, config)
        Script script
        try {
            script = shell.parse(new File(path).text, 'Jenkinsfile')
            script.run()
        } catch (Throwable e) {
            println "FAIL path ${path}: cannot be read: ${e.class.simpleName}: ${e.message}"
            bad++
            continue
        }
        for (want in scenarios) {
            def sc = new Scenario(name: want.name, env: new LinkedHashMap(want.env), params: want.params ?: [:],
                answers: want.answers ?: [], files: want.files ?: [:])
            List<String> problems
            try {
                Sim.play(dsl.stageList, sc, script, binding)
                problems = judge(want, sc)
            } catch (Throwable e) {
                problems = ["the model could not run it: ${e.class.simpleName}: ${e.message}".toString()]
            }
            if (problems) {
                bad++
                println "FAIL path ${path}: ${want.name}:"
                problems.each { println "  - ${it}" }
                println "  stages run: ${sc.stagesRun}"
            } else {
                println "ok   path ${path}: ${want.name}: make ${sc.targets().join(', ') ?: '(none)'} -> ${sc.result}"
            }
        }
    }
    System.exit(bad)
}
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
