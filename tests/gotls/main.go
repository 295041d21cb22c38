// A Go net/http service over TLS, for the agent's Go crypto/tls tests.
//
//	server PORT [plain]   serves /hello, and a gRPC method /demo.Greeter/SayHello (gRPC's wire
//	                      format over Go's own HTTP/2), with a certificate it makes itself
//	                      (written to $GOTLS_CERT_OUT if set); plain: HTTP/1.1 without TLS
//	client URL N [h1]     GET N times on one connection (HTTP/2 unless h1), printing each status
//	grpc URL N            N unary gRPC calls on one HTTP/2 connection, the last one failing
package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"os"
	"strconv"
	"time"
)

func certificate() tls.Certificate {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		DNSNames:     []string{"localhost"},
	}
	der, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if out := os.Getenv("GOTLS_CERT_OUT"); out != "" { // for clients that verify it (grpcio)
		os.WriteFile(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// One gRPC message: a compressed flag, a big-endian length, the bytes.
func grpcFrame(msg []byte) []byte {
	out := make([]byte, 5+len(msg))
	binary.BigEndian.PutUint32(out[1:5], uint32(len(msg)))
	copy(out[5:], msg)
	return out
}

// A unary method that echoes its request message; a request "fail" gets NOT_FOUND.
func sayHello(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	w.Header().Set("Content-Type", "application/grpc")
	w.Header().Set("Trailer", "Grpc-Status, Grpc-Message")
	if len(body) >= 5 && bytes.Equal(body[5:], []byte("fail")) {
		w.WriteHeader(http.StatusOK)
		w.Header().Set("Grpc-Status", "5")
		w.Header().Set("Grpc-Message", "no such greeting")
		return
	}
	w.WriteHeader(http.StatusOK)
	if len(body) >= 5 {
		w.Write(grpcFrame(body[5:]))
	}
	w.Header().Set("Grpc-Status", "0")
}

func serve(port string, plain bool) {
	mux := http.NewServeMux()
	mux.HandleFunc("/hello", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello over %s\n", r.Proto)
	})
	mux.HandleFunc("/demo.Greeter/SayHello", sayHello)
	srv := &http.Server{Addr: "127.0.0.1:" + port, Handler: mux,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{certificate()}}}
	var err error
	if plain {
		err = srv.ListenAndServe()
	} else {
		err = srv.ListenAndServeTLS("", "")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func client(url string, n int, h1 bool) {
	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, ForceAttemptHTTP2: !h1}
	if h1 {
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	c := &http.Client{Transport: tr}
	for i := 0; i < n; i++ {
		resp, err := c.Get(fmt.Sprintf("%s?i=%d", url, i))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		fmt.Printf("%d %s", resp.StatusCode, body)
	}
}

func grpcCalls(url string, n int) {
	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, ForceAttemptHTTP2: true}
	c := &http.Client{Transport: tr}
	for i := 0; i < n; i++ {
		msg := []byte(fmt.Sprintf("hello %d", i))
		if i == n-1 {
			msg = []byte("fail")
		}
		req, _ := http.NewRequest("POST", url+"/demo.Greeter/SayHello", bytes.NewReader(grpcFrame(msg)))
		req.Header.Set("Content-Type", "application/grpc")
		req.Header.Set("TE", "trailers")
		resp, err := c.Do(req)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		io.ReadAll(resp.Body)
		resp.Body.Close()
		fmt.Printf("grpc-status %s\n", resp.Trailer.Get("Grpc-Status"))
	}
}

func main() {
	switch os.Args[1] {
	case "server":
		serve(os.Args[2], len(os.Args) > 3 && os.Args[3] == "plain")
	case "grpc":
		n, _ := strconv.Atoi(os.Args[3])
		grpcCalls(os.Args[2], n)
	case "client":
		n, _ := strconv.Atoi(os.Args[3])
		client(os.Args[2], n, len(os.Args) > 4 && os.Args[4] == "h1")
	}
}
