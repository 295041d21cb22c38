// The "mesh" service of ../README.md in Java 17, standard library only.
//
//   MESH_CONFIG='{"service":"a","port":40001,...}' java Mesh.java
//   (or: javac -d DIR Mesh.java && MESH_CONFIG=... java -cp DIR Mesh)
//
// Server: com.sun.net.httpserver on a fixed pool (a pool thread runs each handler).
// Client: a java.net.http.HttpClient per pool thread (HTTP/1.1, each with its keep-alive
// pool and its own selector thread, which does the socket I/O; one executor for all of
// them). Ground truth goes to truth_dir/<service>-<pid>.jsonl.

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;

import java.io.*;
import java.net.InetSocketAddress;
import java.net.URI;
import java.net.http.*;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.time.Duration;
import java.util.*;
import java.util.concurrent.*;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.locks.LockSupport;

public class Mesh {
    static final byte[] TIMING_BODY = "{\"ok\":true}".getBytes(StandardCharsets.UTF_8);

    final String service;
    final boolean fields; // payload mode "fields" (else "timing": no id anywhere)
    final int port;
    final double workMs, thinkMs, flakyRate;
    final Map<String, Object> peers;
    final Truth truth;
    // HttpClient does not tell which connection carried a call. A client per pool thread
    // makes that knowable without anything on the wire: a thread's calls to one peer go one
    // at a time (a handler waits for each; /par's two go to different peers), so each of the
    // client's connections carries a subsequence of them, in order, and ../truth.py places
    // the client's calls on its connections as whole sequences. Its number goes in every
    // CLIENT record. The executor (what runs the clients' dependent tasks) is shared: one
    // cached pool, like the one each client would otherwise make for itself.
    final ExecutorService clientExecutor = Executors.newCachedThreadPool(r -> {
        Thread t = new Thread(r, "mesh-client-worker");
        t.setDaemon(true);
        return t;
    });
    final AtomicInteger clientNo = new AtomicInteger();
    final ThreadLocal<Client> client = ThreadLocal.withInitial(() -> new Client(clientNo.incrementAndGet(),
            HttpClient.newBuilder().version(HttpClient.Version.HTTP_1_1).connectTimeout(Duration.ofSeconds(10))
                    .executor(clientExecutor).build()));

    record Client(int no, HttpClient http) {}
    // Sleeps, k of /var and the 503s of /flaky draw from a Random per pool thread: seeded from
    // (seed, thread number) when the config has a seed, else ThreadLocalRandom.
    final ThreadLocal<Random> rnd;
    final AtomicLong threadNo = new AtomicLong();

    Mesh(Map<String, Object> cfg) throws IOException {
        service = (String) cfg.get("service");
        fields = "fields".equals(cfg.get("mode"));
        port = num(cfg, "port", 0).intValue();
        workMs = num(cfg, "work_ms", 20.0).doubleValue();
        thinkMs = num(cfg, "think_ms", 0.5).doubleValue();
        flakyRate = num(cfg, "flaky_rate", 0.3).doubleValue();
        peers = map(cfg.getOrDefault("peers", Map.of()));
        Number seed = (Number) cfg.get("seed");
        rnd = ThreadLocal.withInitial(() -> seed == null ? ThreadLocalRandom.current()
                : new Random(seed.longValue() * 0x9E3779B97F4A7C15L + threadNo.incrementAndGet()));
        truth = new Truth(Path.of((String) cfg.get("truth_dir")), service);
    }

    public static void main(String[] args) throws Exception {
        // The JDK server writes a response's headers and body in two writes; without TCP_NODELAY
        // the body can wait (Nagle) for the ACK of the headers, i.e. for a delayed ACK. The
        // property is read when the server classes load, so it is set before HttpServer.create.
        System.setProperty("sun.net.httpserver.nodelay", "true");
        String env = System.getenv("MESH_CONFIG");
        if (env == null) throw new IllegalArgumentException("MESH_CONFIG is not set");
        Map<String, Object> cfg = map(new Json(env).parse());
        Mesh mesh = new Mesh(cfg);
        HttpServer server = HttpServer.create(new InetSocketAddress("127.0.0.1", mesh.port), 1024);
        server.createContext("/", mesh::handle);
        server.setExecutor(Executors.newFixedThreadPool(num(cfg, "threads", 16).intValue()));
        // SIGTERM runs the shutdown hooks: the truth file is flushed there (exit status 143).
        Runtime.getRuntime().addShutdownHook(new Thread(mesh.truth::close));
        server.start();
        System.err.println("mesh " + mesh.service + " (pid " + mesh.truth.pid + ") on 127.0.0.1:" + mesh.port);
    }

    // ---- serving -------------------------------------------------------------------------

    void handle(HttpExchange ex) {
        long t0 = System.nanoTime();
        String id = truth.nextId(); // taken before any call, so that the calls can name it
        String op = ex.getRequestURI().getPath();
        String n = fields ? queryId(ex.getRequestURI().getRawQuery()) : null;
        int peerPort = ex.getRemoteAddress().getPort();
        boolean ok = true;
        int code;
        try {
            code = route(op, n, id);
        } catch (Exception e) {
            ok = false;
            code = 500;
        }
        byte[] body = !fields ? TIMING_BODY
                : ("{\"id\":" + q(n) + ",\"service\":" + q(service) + "}").getBytes(StandardCharsets.UTF_8);
        // t1 before the response is written, t_done once the exchange is closed: the callee's
        // [t0, t1] must lie inside its caller's call (which ends when the caller has read the
        // response) and inside the exchange the agent sees; t_done bounds when it was out.
        long t1 = System.nanoTime();
        try (OutputStream out = ex.getResponseBody()) {
            ex.getResponseHeaders().set("Content-Type", "application/json");
            ex.sendResponseHeaders(code, body.length); // fixed Content-Length
            out.write(body);
        } catch (IOException e) {
            ok = false;
        } finally {
            ex.close();
        }
        long tDone = System.nanoTime();
        truth.write("{\"kind\":\"SERVER\",\"service\":" + q(service) + ",\"pid\":" + truth.pid + ",\"id\":" + q(id)
                + ",\"op\":" + q(op) + ",\"port\":" + port + ",\"peer_port\":" + peerPort + ",\"key\":" + q(key(op, n))
                + ",\"ok\":" + ok + ",\"t0\":" + t0 + ",\"t1\":" + t1 + ",\"t_done\":" + tDone
                + ",\"clock\":\"monotonic\"}");
    }

    /** The route's work; returns the status to answer. `parent`: this request's record id. */
    int route(String op, String n, String parent) throws Exception {
        switch (op) {
            case "/seq" -> {
                think();
                call("b", "/b", n, parent);
                think();
                call("c", "/c", n, parent);
            }
            case "/par" -> {
                think(); // one step: both calls leave together
                parallel(n, parent);
            }
            case "/deep" -> { // a -> b -> c
                if (!service.equals("a") && !service.equals("b")) return 404;
                think();
                if (service.equals("a")) call("b", "/deep", n, parent);
                else call("c", "/c", n, parent);
            }
            case "/var" -> {
                for (int k = 1 + rnd.get().nextInt(4); k > 0; k--) {
                    think();
                    call("b", "/b", n, parent);
                }
            }
            case "/retry" -> { // answered 200 even after three 503s: the attempts are in the truth
                for (int attempt = 0; attempt < 3; attempt++) {
                    think();
                    if (call("c", "/flaky", n, parent) == 200) break;
                }
            }
            case "/b", "/c" -> sleep(workMs);
            case "/flaky" -> {
                sleep(workMs);
                return rnd.get().nextDouble() < flakyRate ? 503 : 200;
            }
            default -> {
                return 404;
            }
        }
        return 200;
    }

    /** What the callee will see, "/b:N" (fields mode); null in timing mode. */
    static String key(String op, String n) { return n == null ? null : op + ":" + n; }

    static String queryId(String rawQuery) {
        if (rawQuery != null)
            for (String kv : rawQuery.split("&"))
                if (kv.startsWith("id=")) return kv.substring(3);
        return null;
    }

    void think() throws InterruptedException { sleep(thinkMs); }

    /** An exponential sleep. parkNanos, not Thread.sleep: sleep(ms, ns) rounds to whole
     *  milliseconds, too coarse for think_ms = 0.5. */
    void sleep(double meanMs) throws InterruptedException {
        if (meanMs <= 0) return;
        long end = System.nanoTime() + (long) (-meanMs * Math.log(1.0 - rnd.get().nextDouble()) * 1e6);
        for (long left; (left = end - System.nanoTime()) > 0; ) {
            LockSupport.parkNanos(left); // may return early: loop until the deadline
            if (Thread.interrupted()) throw new InterruptedException();
        }
    }

    // ---- calling -------------------------------------------------------------------------

    /** One outgoing call and its CLIENT record: t0 before it is sent, t1 once the response
     *  body is read (ofByteArray completes then). HttpClient does not tell the local port:
     *  the record names the client (this pool thread's) that made the call instead. */
    final class Call {
        final String id = truth.nextId(), parent, op, key;
        final int peerPort;
        final Client via = client.get();
        final HttpRequest request;
        long t0, t1;
        boolean ok;

        Call(String peer, String op, String n, String parent) {
            Map<String, Object> p = map(peers.get(peer));
            this.parent = parent;
            this.op = op;
            this.key = key(op, n);
            this.peerPort = num(p, "port", 0).intValue();
            String uri = "http://" + p.get("host") + ":" + peerPort + op + (n == null ? "" : "?id=" + n);
            request = HttpRequest.newBuilder(URI.create(uri)).timeout(Duration.ofSeconds(30)).GET().build();
        }

        void end(boolean ok) { t1 = System.nanoTime(); this.ok = ok; }

        void record() {
            truth.write("{\"kind\":\"CLIENT\",\"service\":" + q(service) + ",\"pid\":" + truth.pid + ",\"id\":" + q(id)
                    + ",\"parent\":" + q(parent) + ",\"op\":" + q(op) + ",\"peer_port\":" + peerPort
                    + ",\"lport\":null,\"client\":" + via.no() + ",\"key\":" + q(key) + ",\"ok\":" + ok
                    + ",\"t0\":" + t0 + ",\"t1\":" + t1 + ",\"clock\":\"monotonic\"}");
        }
    }

    /** A synchronous call from the handler's thread; returns the status (a 503 is an answer). */
    int call(String peer, String op, String n, String parent) throws IOException, InterruptedException {
        Call c = new Call(peer, op, n, parent);
        c.t0 = System.nanoTime();
        try {
            int status = c.via.http().send(c.request, HttpResponse.BodyHandlers.ofByteArray()).statusCode();
            c.end(true);
            return status;
        } catch (IOException | InterruptedException | RuntimeException e) {
            c.end(false);
            throw e;
        } finally {
            c.record();
        }
    }

    /** /par: b /b and c /c at once (sendAsync); each call ends when its own future completes. */
    void parallel(String n, String parent) {
        List<Call> calls = List.of(new Call("b", "/b", n, parent), new Call("c", "/c", n, parent));
        List<CompletableFuture<?>> futures = new ArrayList<>();
        for (Call c : calls) {
            c.t0 = System.nanoTime();
            futures.add(c.via.http().sendAsync(c.request, HttpResponse.BodyHandlers.ofByteArray())
                    .whenComplete((r, e) -> c.end(e == null)));
        }
        try { // allOf waits for both even if one fails; its join orders our reads after end()
            CompletableFuture.allOf(futures.toArray(new CompletableFuture<?>[0])).join();
        } finally {
            calls.forEach(Call::record);
        }
    }

    // ---- ground truth --------------------------------------------------------------------

    /** JSON lines in one file per process, buffered (1 MiB), flushed at exit. */
    static final class Truth {
        final long pid = ProcessHandle.current().pid();
        final AtomicLong seq = new AtomicLong();
        final BufferedWriter out;
        boolean closing; // after the exit flush, a straggler's record is flushed at once

        Truth(Path dir, String service) throws IOException {
            out = new BufferedWriter(new OutputStreamWriter(new FileOutputStream(
                    dir.resolve(service + "-" + pid + ".jsonl").toFile(), true), StandardCharsets.UTF_8), 1 << 20);
        }

        String nextId() { return pid + "-" + seq.incrementAndGet(); }

        synchronized void write(String line) {
            try {
                out.write(line);
                out.write('\n');
                if (closing) out.flush();
            } catch (IOException e) {
                throw new UncheckedIOException(e);
            }
        }

        synchronized void close() {
            closing = true;
            try {
                out.flush();
            } catch (IOException e) {
                e.printStackTrace();
            }
        }
    }

    // ---- JSON ----------------------------------------------------------------------------

    /** A JSON string, or null. */
    static String q(String s) {
        if (s == null) return "null";
        StringBuilder b = new StringBuilder("\"");
        for (char ch : s.toCharArray()) {
            if (ch == '"' || ch == '\\') b.append('\\').append(ch);
            else if (ch < 0x20) b.append(String.format("\\u%04x", (int) ch));
            else b.append(ch);
        }
        return b.append('"').toString();
    }

    @SuppressWarnings("unchecked")
    static Map<String, Object> map(Object o) {
        if (!(o instanceof Map)) throw new IllegalArgumentException("MESH_CONFIG: expected an object: " + o);
        return (Map<String, Object>) o;
    }

    static Number num(Map<String, Object> m, String k, Number dflt) {
        Object v = m.get(k);
        return v == null ? dflt : (Number) v;
    }

    /** Just enough JSON for the config: objects, arrays, strings, numbers, true/false/null. */
    static final class Json {
        final String s;
        int i;

        Json(String s) { this.s = s; }

        Object parse() {
            Object v = value();
            if (skipWs() < s.length()) throw err("trailing characters");
            return v;
        }

        Object value() {
            char ch = peek();
            if (ch == '{') {
                Map<String, Object> m = new LinkedHashMap<>();
                i++;
                if (peek() == '}') { i++; return m; }
                do {
                    skipWs();
                    String k = string();
                    expect(':');
                    m.put(k, value());
                } while (more('}'));
                return m;
            }
            if (ch == '[') {
                List<Object> l = new ArrayList<>();
                i++;
                if (peek() == ']') { i++; return l; }
                do l.add(value()); while (more(']'));
                return l;
            }
            if (ch == '"') return string();
            for (String lit : new String[] {"true", "false", "null"})
                if (s.startsWith(lit, i)) {
                    i += lit.length();
                    return lit.equals("null") ? null : Boolean.valueOf(lit);
                }
            int start = i;
            while (i < s.length() && "+-0123456789.eE".indexOf(s.charAt(i)) >= 0) i++;
            if (start == i) throw err("unexpected character");
            String t = s.substring(start, i);
            return t.matches("-?\\d+") ? (Number) Long.valueOf(t) : (Number) Double.valueOf(t);
        }

        String string() {
            expect('"');
            StringBuilder b = new StringBuilder();
            for (char ch; (ch = next()) != '"'; ) {
                if (ch != '\\') { b.append(ch); continue; }
                switch (ch = next()) {
                    case 'b' -> b.append('\b');
                    case 'f' -> b.append('\f');
                    case 'n' -> b.append('\n');
                    case 'r' -> b.append('\r');
                    case 't' -> b.append('\t');
                    case 'u' -> b.append((char) Integer.parseInt("" + next() + next() + next() + next(), 16));
                    default -> b.append(ch); // \" \\ \/
                }
            }
            return b.toString();
        }

        /** After a member: true on ',', false on the closing bracket. */
        boolean more(char close) {
            char ch = peek();
            i++;
            if (ch != ',' && ch != close) throw err("expected ',' or '" + close + "'");
            return ch == ',';
        }

        void expect(char ch) {
            if (peek() != ch) throw err("expected '" + ch + "'");
            i++;
        }

        char peek() {
            if (skipWs() >= s.length()) throw err("unexpected end");
            return s.charAt(i);
        }

        char next() {
            if (i >= s.length()) throw err("unterminated string");
            return s.charAt(i++);
        }

        int skipWs() {
            while (i < s.length() && Character.isWhitespace(s.charAt(i))) i++;
            return i;
        }

        IllegalArgumentException err(String what) {
            return new IllegalArgumentException("MESH_CONFIG: " + what + " at " + i);
        }
    }
}
