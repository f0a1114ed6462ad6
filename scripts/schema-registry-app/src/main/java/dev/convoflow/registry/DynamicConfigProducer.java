package dev.convoflow.registry;

import java.util.ArrayList;

import javax.enterprise.inject.Produces;
import javax.inject.Singleton;

import io.apicurio.common.apps.config.DynamicConfigPropertyList;

/**
 * Stands in for apicurio-common-app-components-config-index, whose Quarkus deployment module is not
 * published: that extension generates this bean from the @Dynamic config properties at build time.
 * An empty list means no property can be changed at runtime through the admin API (not needed here).
 */
public class DynamicConfigProducer {
    @Produces
    @Singleton
    DynamicConfigPropertyList dynamicConfigPropertyList() {
        return new DynamicConfigPropertyList(new ArrayList<>());
    }
}
