// mesh: the foreign-services mesh (see ../README.md) in Go, standard library only.
//
// One program runs as service a, b or c (MESH_CONFIG). It serves with net/http, calls its
// peers with one shared keep-alive http.Transport, and writes its own ground truth (one JSON
// line per request handled and per call made) to truth_dir/<service>-<pid>.jsonl.
// Goroutines are left to the scheduler (no GOMAXPROCS, no thread pinning): which OS thread
// reads, calls and answers is the runtime's choice, which is the point of this service.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"math/rand"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

type peer struct {
	Host string `json:"host"`
	Port int    `json:"port"`
}

type config struct {
	Service   string          `json:"service"`
	Port      int             `json:"port"`
	TruthDir  string          `json:"truth_dir"`
	Mode      string          `json:"mode"` // "fields" or "timing"
	Peers     map[string]peer `json:"peers"`
	DNSPort   int             `json:"dns_port"` // 0: absent, peers' hosts are IPs
	WorkMs    float64         `json:"work_ms"`
	ThinkMs   float64         `json:"think_ms"`
	FlakyRate float64         `json:"flaky_rate"`
	Seed      int64           `json:"seed"`
}

// Records, field for field as ../services/common.py writes them (struct order = key order).
type serverRec struct {
	Kind     string  `json:"kind"`
	Service  string  `json:"service"`
	PID      int     `json:"pid"`
	ID       string  `json:"id"`
	Op       string  `json:"op"`
	Port     int     `json:"port"`
	PeerPort int     `json:"peer_port"`
	Key      *string `json:"key"`
	OK       bool    `json:"ok"`
	Clock    string  `json:"clock"`
	T0       int64   `json:"t0"`
	T1       int64   `json:"t1"`
}

type clientRec struct {
	Kind     string  `json:"kind"`
	Service  string  `json:"service"`
	PID      int     `json:"pid"`
	ID       string  `json:"id"`
	Parent   string  `json:"parent"`
	Op       string  `json:"op"`
	PeerPort int     `json:"peer_port"`
	Lport    *int    `json:"lport"` // null when no connection was handed over (dial failed)
	Key      *string `json:"key"`
	OK       bool    `json:"ok"`
	Clock    string  `json:"clock"`
	T0       int64   `json:"t0"`
	T1       int64   `json:"t1"`
	TConn    *int64  `json:"t_conn,omitempty"`
}

var (
	cfg    config
	pid    = os.Getpid()
	nextID atomic.Int64

	// Buffered truth: a write per record would add a syscall per call in the traced process.
	truthMu sync.Mutex
	truthW  *bufio.Writer

	rngMu sync.Mutex // *rand.Rand is not safe for concurrent use
	rng   *rand.Rand

	client *http.Client
)

// now reads CLOCK_MONOTONIC, as the agent's kernel stamps do: the wall clock of a VM can be
// stepped or slewed while a run lasts (we saw 5-35 ms), and the truth would drift off the spans.
func now() int64 {
	var ts syscall.Timespec
	syscall.Syscall(syscall.SYS_CLOCK_GETTIME, 1 /* CLOCK_MONOTONIC */, uintptr(unsafe.Pointer(&ts)), 0)
	return ts.Nano()
}
func newID() string     { return fmt.Sprintf("%d-%d", pid, nextID.Add(1)) }
func uniform(n int) int { rngMu.Lock(); defer rngMu.Unlock(); return rng.Intn(n) }

func writeTruth(rec any) {
	line, err := json.Marshal(rec)
	if err != nil {
		log.Printf("truth: %v", err)
		return
	}
	truthMu.Lock()
	defer truthMu.Unlock()
	truthW.Write(append(line, '\n'))
}

// sleepExp sleeps an exponentially distributed time of the given mean (ms).
func sleepExp(meanMs float64) {
	if meanMs <= 0 {
		return
	}
	rngMu.Lock()
	d := rng.ExpFloat64() * meanMs
	rngMu.Unlock()
	time.Sleep(time.Duration(d * float64(time.Millisecond)))
}

// key is what the callee will see: "/b:N" in fields mode, null in timing mode.
func key(op, id string) *string {
	if cfg.Mode != "fields" {
		return nil
	}
	k := op + ":" + id
	return &k
}

// call makes one GET to a peer on behalf of the request `parent` and records it. It returns
// the status and whether an answer came (a 503 is an answer).
func call(parent, peerName, op, id string) (int, bool) {
	p := cfg.Peers[peerName]
	url := fmt.Sprintf("http://%s:%d%s", p.Host, p.Port, op)
	if cfg.Mode == "fields" {
		url += "?id=" + id // the same id all the way down the tree
	}
	rec := clientRec{Kind: "CLIENT", Clock: "monotonic", Service: cfg.Service, PID: pid, ID: newID(), Parent: parent,
		Op: op, PeerPort: p.Port, Key: key(op, id), OK: true, T0: now()}
	// GotConn runs in this goroutine, inside Do, each time the pool hands a connection over
	// (again if the Transport retries on another one): the last one carried the call.
	trace := &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) {
		t := now()
		rec.TConn = &t
		if a, ok := info.Conn.LocalAddr().(*net.TCPAddr); ok {
			port := a.Port
			rec.Lport = &port
		}
	}}
	status := 0
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), "GET", url, nil)
	if err == nil {
		var resp *http.Response
		if resp, err = client.Do(req); err == nil {
			// Read to EOF and close, or the connection would not go back to the pool.
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			status = resp.StatusCode
		}
	}
	rec.T1 = now()
	if err != nil {
		rec.OK = false
		log.Printf("call %s %s: %v", peerName, op, err)
	}
	writeTruth(rec)
	return status, err == nil
}

// step is one step of a non-leaf handler: think, then call.
func step(parent, peerName, op, id string) bool {
	sleepExp(cfg.ThinkMs)
	_, ok := call(parent, peerName, op, id)
	return ok
}

func handle(w http.ResponseWriter, r *http.Request) {
	t0 := now()
	op, svc := r.URL.Path, cfg.Service
	route := svc + op
	switch route {
	case "a/seq", "a/par", "a/deep", "a/var", "a/retry", "b/deep", "b/b", "c/c", "c/flaky":
	default:
		http.NotFound(w, r) // not part of the mesh: no record
		return
	}
	id := r.URL.Query().Get("id") // "" in timing mode, unused there
	_, portStr, _ := net.SplitHostPort(r.RemoteAddr)
	peerPort, _ := strconv.Atoi(portStr)
	rec := serverRec{Kind: "SERVER", Clock: "monotonic", Service: svc, PID: pid, ID: newID(), Op: op, Port: cfg.Port,
		PeerPort: peerPort, Key: key(op, id), OK: true, T0: t0}

	ok, status := true, http.StatusOK
	switch route {
	case "a/seq":
		ok = step(rec.ID, "b", "/b", id) && step(rec.ID, "c", "/c", id)
	case "a/par":
		sleepExp(cfg.ThinkMs) // one step: both calls at once
		var okB, okC bool
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); _, okB = call(rec.ID, "b", "/b", id) }()
		go func() { defer wg.Done(); _, okC = call(rec.ID, "c", "/c", id) }()
		wg.Wait()
		ok = okB && okC
	case "a/deep":
		ok = step(rec.ID, "b", "/deep", id)
	case "b/deep":
		ok = step(rec.ID, "c", "/c", id)
	case "a/var":
		for k := 1 + uniform(4); k > 0 && ok; k-- {
			ok = step(rec.ID, "b", "/b", id)
		}
	case "a/retry":
		// Until a 200, at most 3 attempts; a call that gets no answer fails the handler.
		// Giving up after three 503s is still an answer: pass the 503 on (ok stays true).
		for attempt := 0; attempt < 3; attempt++ {
			sleepExp(cfg.ThinkMs)
			if status, ok = call(rec.ID, "c", "/flaky", id); !ok || status == http.StatusOK {
				break
			}
		}
	case "c/flaky":
		sleepExp(cfg.WorkMs)
		rngMu.Lock()
		if rng.Float64() < cfg.FlakyRate {
			status = http.StatusServiceUnavailable // same body: an answer all the same
		}
		rngMu.Unlock()
	default: // the leaves b/b, c/c
		sleepExp(cfg.WorkMs)
	}
	if !ok {
		rec.OK, status = false, http.StatusBadGateway
	}

	body := []byte(`{"ok":true}`)
	if cfg.Mode == "fields" {
		body, _ = json.Marshal(struct {
			ID      string `json:"id"`
			Service string `json:"service"`
		}{id, svc})
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(body)
	// t1 now, with the body in the ResponseWriter's buffer: net/http puts the response on
	// the socket once we return (adding Content-Length), so the response leaves after t1 and
	// the caller cannot have it before then (../../truth.py relies on both). No Flush here.
	rec.T1 = now()
	writeTruth(rec)
}

func main() {
	if err := json.Unmarshal([]byte(os.Getenv("MESH_CONFIG")), &cfg); err != nil {
		log.Fatalf("MESH_CONFIG: %v", err)
	}
	log.SetPrefix(fmt.Sprintf("mesh %s[%d]: ", cfg.Service, pid))
	rng = rand.New(rand.NewSource(cfg.Seed + int64(pid)))

	f, err := os.OpenFile(filepath.Join(cfg.TruthDir, fmt.Sprintf("%s-%d.jsonl", cfg.Service, pid)),
		os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		log.Fatal(err)
	}
	truthW = bufio.NewWriterSize(f, 1<<20)

	dialer := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}
	if cfg.DNSPort != 0 {
		// Go's own resolver, sent to the local dnsmasq whatever resolv.conf names. No cache
		// here: each new connection looks the name up (A and AAAA), as Go does by itself.
		dnsAddr := fmt.Sprintf("127.0.0.1:%d", cfg.DNSPort)
		dialer.Resolver = &net.Resolver{PreferGo: true,
			Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, network, dnsAddr) // "udp", or "tcp" on truncation
			}}
	}
	client = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		Proxy:               nil, // never an environment proxy: calls go straight to the peer
		DialContext:         dialer.DialContext,
		MaxIdleConns:        256,
		MaxIdleConnsPerHost: 64,
		IdleConnTimeout:     90 * time.Second,
	}}

	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", cfg.Port))
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(handle)}
	go func() {
		if err := srv.Serve(ln); err != http.ErrServerClosed {
			log.Fatal(err)
		}
	}()

	// Exit cleanly on SIGTERM/SIGINT: let handlers in flight finish (briefly), then flush.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	srv.Shutdown(ctx)
	cancel()
	truthMu.Lock()
	truthW.Flush()
	f.Close()
	os.Exit(0)
}
