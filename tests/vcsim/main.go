// vcsim for pilotlight's tests: VMware's vSphere simulator (govmomi's simulator
// package, Debian golang-github-vmware-govmomi-dev) with one datacenter, host and two
// VMs, serving SOAP over HTTPS on a loopback port. Prints the SDK URL (with the
// credentials) on stdout, then serves until stdin closes.
//
// Build: GOPATH=/usr/share/gocode GO111MODULE=off go build -o vcsim ./tests/vcsim
package main

import (
	"fmt"
	"io"
	"net/url"
	"os"

	"github.com/vmware/govmomi/simulator"
)

func main() {
	model := simulator.VPX()
	model.Datacenter = 1
	model.Cluster = 0
	model.Host = 1
	model.Machine = 2
	model.Autostart = true
	if err := model.Create(); err != nil {
		fmt.Fprintln(os.Stderr, "vcsim:", err)
		os.Exit(1)
	}
	defer model.Remove()
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0"}
	model.Service.TLS = nil
	server := model.Service.NewServer()
	defer server.Close()
	fmt.Println(server.URL.String())
	os.Stdout.Sync()
	_, _ = io.Copy(io.Discard, os.Stdin)
}
