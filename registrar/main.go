// peat-csi-registrar registers the CSI driver models.peat.dev (served by `peat agent`) with the
// kubelet: it serves the kubelet's plugin registration API on a socket in the kubelet's
// plugins_registry directory and names the driver's CSI socket as the endpoint.
//
// Why not the agent itself: the kubelet's plugin watcher sends the socket's path as the HTTP/2
// :authority, which the agent's HTTP/2 server (h2, under tonic) refuses as malformed; grpc-go
// accepts it. The kubelet's CSI client sends "localhost", so the agent serves CSI itself.
// Why not csi-node-driver-registrar: it is not on the Go module proxy these machines reach, and
// this is all of it that the driver needs.
package main

import (
	"context"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"google.golang.org/grpc"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type registrar struct {
	registerapi.UnimplementedRegistrationServer
	driver   string
	endpoint string
}

func (r *registrar) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              r.driver,
		Endpoint:          r.endpoint,
		SupportedVersions: []string{"1.0.0"},
	}, nil
}

func (r *registrar) NotifyRegistrationStatus(_ context.Context, s *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if s.PluginRegistered {
		log.Printf("the kubelet registered %s (CSI endpoint %s)", r.driver, r.endpoint)
	} else {
		log.Printf("the kubelet refused %s: %s", r.driver, s.Error)
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

func main() {
	kubeletDir := flag.String("kubelet-dir", "/var/lib/kubelet", "the kubelet's root directory")
	driver := flag.String("driver", "models.peat.dev", "the CSI driver's name")
	flag.Parse()
	endpoint := filepath.Join(*kubeletDir, "plugins", *driver, "csi.sock")
	socket := filepath.Join(*kubeletDir, "plugins_registry", *driver+"-reg.sock")
	if err := os.MkdirAll(filepath.Dir(socket), 0o750); err != nil {
		log.Fatalf("creating %s: %v", filepath.Dir(socket), err)
	}
	// A socket of an earlier run: listening again makes the kubelet register the driver again.
	_ = os.Remove(socket)
	l, err := net.Listen("unix", socket)
	if err != nil {
		log.Fatalf("listening on %s: %v", socket, err)
	}
	server := grpc.NewServer()
	registerapi.RegisterRegistrationServer(server, &registrar{driver: *driver, endpoint: endpoint})
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		server.GracefulStop()
	}()
	log.Printf("serving the plugin registration of %s on %s", *driver, socket)
	if err := server.Serve(l); err != nil {
		log.Fatalf("serving: %v", err)
	}
	// Gone: the kubelet deregisters the driver.
	_ = os.Remove(socket)
}
