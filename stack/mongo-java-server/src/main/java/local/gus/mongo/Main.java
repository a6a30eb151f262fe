package local.gus.mongo;

import de.bwaldvogel.mongo.MongoServer;
import de.bwaldvogel.mongo.backend.h2.H2Backend;
import java.nio.file.Path;
import org.h2.mvstore.MVStore;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The local stack's MongoDB-wire-protocol server: mongo-java-server on its H2 backend.
 *
 * <p>Usage: {@code java -cp classes:libs/* local.gus.mongo.Main HOST PORT STORE_FILE}
 *
 * <p>Every database the server is asked for lives in one H2 MVStore file, so data
 * survives restarts. MVStore commits in the background (about once a second) and on
 * close: SIGTERM runs the shutdown hook, which stops the server and closes the store,
 * so nothing is lost; a SIGKILL can lose the last second of writes.
 */
public final class Main {

    private Main() {
    }

    public static void main(String[] args) {
        if (args.length != 3) {
            System.err.println("usage: local.gus.mongo.Main HOST PORT STORE_FILE");
            System.exit(2);
        }
        String host = args[0];
        int port = Integer.parseInt(args[1]);
        Path storeFile = Path.of(args[2]).toAbsolutePath();

        configureLogging();
        Logger log = LoggerFactory.getLogger(Main.class);

        MVStore store = new MVStore.Builder().fileName(storeFile.toString()).open();
        MongoServer server = new MongoServer(new H2Backend(store));
        // Registered before bind(), so that a failed bind (System.exit below) also
        // closes the store and releases its file lock.
        Runtime.getRuntime().addShutdownHook(
                new Thread(() -> shutdown(server, store, log), "gus-mongo-shutdown"));
        try {
            server.bind(host, port);
        } catch (Exception e) {
            // Netty rethrows the checked BindException without declaring it.
            log.error("cannot listen on {}:{}", host, port, e);
            System.exit(1);
        }
        // main() returns here; Netty's non-daemon event-loop threads keep the JVM
        // serving until a signal runs the shutdown hook.
        log.info("listening on {}:{}, data in {}", host, port, storeFile);
    }

    /** Stops accepting clients, then closes the backend, which closes the store. */
    private static void shutdown(MongoServer server, MVStore store, Logger log) {
        log.info("shutting down");
        try {
            server.shutdown();
        } finally {
            // H2Backend.close() already closed it unless shutdown() failed midway.
            if (!store.isClosed()) {
                store.close();
            }
            log.info("store closed");
        }
    }

    /** slf4j-simple defaults: timestamped lines on stdout, which the stack logs to a file. */
    private static void configureLogging() {
        setDefault("org.slf4j.simpleLogger.logFile", "System.out");
        setDefault("org.slf4j.simpleLogger.showDateTime", "true");
        setDefault("org.slf4j.simpleLogger.dateTimeFormat", "yyyy-MM-dd HH:mm:ss.SSS");
        setDefault("org.slf4j.simpleLogger.defaultLogLevel", "info");
    }

    private static void setDefault(String key, String value) {
        if (System.getProperty(key) == null) {
            System.setProperty(key, value);
        }
    }
}
