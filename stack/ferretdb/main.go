// Command gus-ferretdb serves FerretDB's embeddable server with the SQLite handler.
package main

import (
	"context"
	"flag"
	"log"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen-addr", "127.0.0.1:37017", "TCP address to listen on")
	sqliteURL := flag.String("sqlite-url", "file:data/", "SQLite URI of the data dir, ending in /")
	flag.Parse()

	// SIGTERM (sent by the stack's stop) closes the listener and the SQLite files cleanly.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	// Warnings only: at info level FerretDB logs every connection open and close.
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	server, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: *listen},
		Handler:   "sqlite",
		SQLiteURL: *sqliteURL,
		Logger:    logger,
	})
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("FerretDB (sqlite handler, %s) listening on %s", *sqliteURL, server.MongoDBURI())
	if err := server.Run(ctx); err != nil {
		log.Fatal(err)
	}
	log.Print("FerretDB stopped")
}
